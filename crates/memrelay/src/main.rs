//! The `memrelay` binary: arguments in, proxy running. Nothing else.
#![deny(unsafe_code)]

use memrelay::config::cli::{parse_args, reread, Action, EXIT_USAGE, HELP, USAGE_LINE};
use memrelay::config::Origin;

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
    if let Err(e) = memrelay::logging::init(&cfg) {
        eprintln!("memrelay: {e}");
        std::process::exit(1);
    }
    let logs_to_file = cfg.log_file.is_some();
    // A reload reads the same file and applies the same flags again.
    let again = std::sync::Arc::new(move || reread(&args));
    if let Err(e) = memrelay::server::run(*cfg, again) {
        // Logged, not just printed, so that a log collector reading JSON
        // sees why the process stopped.
        tracing::error!(error = %e, "cannot start");
        if logs_to_file {
            // Whoever started it is looking at the terminal, not the file.
            eprintln!("memrelay: cannot start: {e}");
        }
        std::process::exit(e.exit_code());
    }
}
