//! The one place that maps outcomes to process exit codes.
//!
//! Configuration errors get their own code (78, `EX_CONFIG` from sysexits.h) so that a
//! supervisor such as systemd can be told not to restart a service whose files are wrong
//! (`RestartPreventExitStatus=78`).

use std::process::ExitCode;

/// The exit codes, as shown in `weir --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0   success: every pipeline finished, or drained after SIGINT/SIGTERM
  1   runtime failure: an operator failed, or shutdown missed its deadline
  2   usage error: unknown flag or missing argument
  78  configuration error: a pipeline file is invalid (see the messages)
  130 interrupted twice: stopped without draining";

/// How a command ended.
pub enum Outcome {
    /// Everything went well.
    Success,
    /// The configuration is invalid; the problems were already printed.
    ConfigInvalid,
    /// Something failed while running.
    RuntimeFailure(String),
    /// A second signal arrived during shutdown.
    Interrupted,
}

impl Outcome {
    /// Prints the final message, if any, and returns the exit code.
    pub fn report(self) -> ExitCode {
        match self {
            Outcome::Success => ExitCode::SUCCESS,
            Outcome::ConfigInvalid => ExitCode::from(78),
            Outcome::RuntimeFailure(message) => {
                eprintln!("error: {message}");
                ExitCode::from(1)
            }
            Outcome::Interrupted => {
                eprintln!("error: interrupted again during shutdown; stopped without draining");
                ExitCode::from(130)
            }
        }
    }
}
