//! Handler errors carry a decision: retry (transient) or reject (dead-letter now).

use std::fmt;

/// Why a handler failed, and what the host should do about it.
///
/// `?` on any error converts it into a *retryable* failure: the host retries with backoff up to the
/// handler's `max_retries`, then dead-letters the message. Use [`HandlerError::reject`] when retrying
/// cannot help (invalid input, a broken invariant): the message is dead-lettered at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    retryable: bool,
    message: String,
}

impl HandlerError {
    /// A transient failure: retry with backoff.
    pub fn retry(reason: impl fmt::Display) -> Self {
        Self {
            retryable: true,
            message: reason.to_string(),
        }
    }

    /// A permanent failure: dead-letter the message now.
    pub fn reject(reason: impl fmt::Display) -> Self {
        Self {
            retryable: false,
            message: reason.to_string(),
        }
    }

    /// Whether the host should retry the message.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The reason, as given.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

// Deliberately not `std::error::Error`: that would conflict with this blanket conversion, which is what
// makes `?` work on any error inside a handler.
impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::retry(error)
    }
}

/// The result type of every handler.
pub type HandlerResult = Result<(), HandlerError>;
