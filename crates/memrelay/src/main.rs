//! The `memrelay` binary: arguments in, proxy running. Nothing else.

use memrelay::config::cli::{parse_args, reread, Action, EXIT_USAGE, HELP, USAGE_LINE};
use memrelay::config::{Config, LogFormat, Origin};

#[global_allocator]
static ALLOC: memrelay::alloc::CountingAlloc = memrelay::alloc::CountingAlloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(args.iter().cloned()) {
        Ok(Action::Run(cfg)) => cfg,
        Ok(Action::Check(cfg)) => {
            for w in &cfg.warnings {
                eprintln!("memrelay: warning: {w}");
            }
            print!("{}", cfg.summary());
            return;
        }
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
            // The usage line helps with a mistyped flag; for a key of the
            // file, the one line naming it is all there is to say.
            if matches!(e.origin, Origin::Flag(_)) {
                eprintln!("{USAGE_LINE}");
            }
            std::process::exit(EXIT_USAGE);
        }
    };
    init_logging(&cfg);
    // A reload reads the same file and applies the same flags again.
    let again = std::sync::Arc::new(move || reread(&args));
    if let Err(e) = memrelay::server::run(*cfg, again) {
        // Logged, not just printed, so that a log collector reading JSON
        // sees why the process stopped.
        tracing::error!(error = %e, "cannot start");
        std::process::exit(1);
    }
}

fn init_logging(cfg: &Config) {
    let level = match cfg.verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("memrelay={level}")));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cfg.log_format {
        LogFormat::Text => logs.init(),
        // One object a line, the event's fields at the top level next to
        // `message`, so a collector can index them without unnesting.
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}
