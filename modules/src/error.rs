//! The errors of module runtimes.

/// A module runtime could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image is not on the machine and could not be loaded.
    #[error(
        "image `{image}` is not on this machine and there is no registry to pull it from: \
         build it (docker build -t {image} .), load it (docker load -i image.tar), or give \
         `image_archive` for Weir to load"
    )]
    ImageMissing {
        /// The image name.
        image: String,
    },
    /// The executable of a process module is missing or not executable.
    #[error("cannot run `{program}`: {reason}")]
    Executable {
        /// The program as configured.
        program: String,
        /// Why not.
        reason: String,
    },
    /// The Docker engine refused or failed a call.
    #[error("docker: {operation}: {message}")]
    Docker {
        /// What was being done (`create container weir-x`).
        operation: String,
        /// What Docker said.
        message: String,
    },
    /// The engine could not be reached at all.
    #[error(
        "cannot reach the Docker engine: {0} (is the daemon running, and may this user use its socket?)"
    )]
    DockerUnavailable(String),
    /// The instance is not known (removed, or never created).
    #[error("no module instance `{0}`")]
    NoSuchInstance(String),
    /// An operating-system call failed.
    #[error("{operation}: {source}")]
    Io {
        /// What was being done.
        operation: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A fake runtime was told to fail this call.
    #[error("{0}")]
    Injected(String),
}

impl RuntimeError {
    /// An I/O error while doing `operation`.
    pub fn io(operation: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            operation: operation.into(),
            source,
        }
    }
}
