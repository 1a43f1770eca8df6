//! Where log lines go, and how they look.
//!
//! To standard error by default; to `--log-file` when given (appending,
//! reopened on SIGUSR1 so that logrotate can move the file away). Colour
//! only when the line goes to a terminal: a file, a pipe or the journal
//! gets plain text, never ANSI escape codes.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::config::{Config, LogFormat};

/// The open log file, if logs go to one: the SIGUSR1 handler reopens it.
static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

/// `--log-file`: lines are written whole under the lock, so lines of
/// several threads never interleave.
#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer of one log line to the file.
#[derive(Debug, Clone, Copy)]
struct ToFile;

/// The file, locked for one line.
struct Line(Option<std::sync::MutexGuard<'static, File>>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ToFile {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        // A panic while a line was being written leaves at worst half a
        // line: keep logging.
        Line(
            LOG_FILE
                .get()
                .map(|l| l.file.lock().unwrap_or_else(|p| p.into_inner())),
        )
    }
}

/// Sets up logging for `cfg`. Fails only when the log file cannot be
/// opened (the message names it).
pub fn init(cfg: &Config) -> Result<(), String> {
    let level = match cfg.verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMRELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("memrelay={level}")));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match &cfg.log_file {
        Some(path) => {
            let file = open(path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            let _ = LOG_FILE.set(LogFile {
                path: path.clone(),
                file: Mutex::new(file),
            });
            let logs = logs.with_writer(ToFile).with_ansi(false);
            match cfg.log_format {
                LogFormat::Text => logs.init(),
                LogFormat::Json => logs.json().flatten_event(true).init(),
            }
        }
        None => {
            let logs = logs
                .with_writer(io::stderr)
                .with_ansi(io::stderr().is_terminal());
            match cfg.log_format {
                LogFormat::Text => logs.init(),
                // One object a line, the event's fields at the top level
                // next to `message`, so a collector can index them without
                // unnesting.
                LogFormat::Json => logs.json().flatten_event(true).init(),
            }
        }
    }
    Ok(())
}

/// SIGUSR1: opens the log file again under its name (logrotate moved the
/// old one away). Nothing to do when logs go to standard error.
pub(crate) fn reopen() {
    let Some(l) = LOG_FILE.get() else {
        return;
    };
    match open(&l.path) {
        Ok(f) => {
            *l.file.lock().unwrap_or_else(|p| p.into_inner()) = f;
            tracing::info!(file = %l.path.display(), "log file reopened");
        }
        Err(e) => {
            tracing::error!(file = %l.path.display(), error = %e, "cannot reopen the log file; still writing to the old one")
        }
    }
}
