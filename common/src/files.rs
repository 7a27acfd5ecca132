//! Errors of the files an operator writes (config, tenant and auth files),
//! one type for both binaries, and reading them.

use std::path::{Path, PathBuf};

/// A file that could not be read, did not parse, or holds a value that is
/// not allowed. The underlying error is part of the message (not a
/// `source()`), so a log line or an error chain shows it exactly once.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

impl FileError {
    pub fn invalid(setting: &'static str, reason: impl Into<String>) -> Self {
        FileError::Invalid {
            setting,
            reason: reason.into(),
        }
    }
}

/// The text of the file at `path`.
pub fn read_text(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|error| FileError::Read {
        path: path.to_owned(),
        error,
    })
}

/// `text`, read from `path`, as TOML.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, FileError> {
    toml::from_str(text).map_err(|error| FileError::Parse {
        path: path.to_owned(),
        error,
    })
}

/// The file at `path` as TOML.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    parse_toml(&read_text(path)?, path)
}
