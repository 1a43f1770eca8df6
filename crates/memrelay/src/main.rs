//! The `memrelay` binary: arguments in, proxy running. Nothing else.

use memrelay::config::cli::{parse_args, Action, EXIT_USAGE, HELP, USAGE_LINE};

#[global_allocator]
static ALLOC: memrelay::alloc::CountingAlloc = memrelay::alloc::CountingAlloc;

fn main() {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Action::Run(cfg)) => cfg,
        Ok(Action::Help) => {
            print!("{HELP}");
            return;
        }
        Ok(Action::Version) => {
            println!("memrelay {}", memrelay::VERSION);
            return;
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{USAGE_LINE}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let level = match cfg.verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("memrelay={level}")));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    if let Err(e) = memrelay::server::run(*cfg) {
        eprintln!("memrelay: {e}");
        std::process::exit(1);
    }
}
