//! Names of disks, ISOs and seeds, the only user input that ever becomes part of a path.
//!
//! Invariant: a name that passes [`check`] is a single path component that is neither `.` nor
//! `..` and does not start with a dot (temporary files do), made of `[A-Za-z0-9._-]`, at most
//! [`MAX_LEN`] bytes long; joined to a pool directory it names a file directly inside it.

/// The longest name accepted, in bytes.
pub const MAX_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("a name is required")]
    Empty,
    /// Longer than [`MAX_LEN`].
    #[error("the name '{0}…' is too long: at most {MAX_LEN} characters")]
    TooLong(String),
    /// Starts with a dot.
    #[error("the name '{0}' starts with a dot; names start with a letter, digit, '_' or '-'")]
    LeadingDot(String),
    /// Holds a character outside the allowed set.
    #[error("the name '{name}' contains {found:?}; use only letters, digits, '.', '_' and '-'")]
    BadCharacter {
        /// The name, with the offending character replaced if it is not printable.
        name: String,
        /// The first character refused.
        found: char,
    },
}

/// Checks a user-supplied name (see the module invariant).
pub fn check(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_LEN {
        return Err(NameError::TooLong(name.chars().take(MAX_LEN).collect()));
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        let printable = name.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        return Err(NameError::BadCharacter { name: printable, found });
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot(name.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["web-1", "debian_12.root", "a", "A-b.c_d", &"x".repeat(MAX_LEN)] {
            assert_eq!(check(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_paths_and_hidden_names() {
        for name in [
            "",
            "..",
            ".",
            "../etc",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "a\\b",
            "a b",
            "a\0b",
            "é",
            "a\nb",
        ] {
            assert!(check(name).is_err(), "{name:?} accepted");
        }
        assert!(matches!(check(&"x".repeat(MAX_LEN + 1)), Err(NameError::TooLong(_))));
    }
}
