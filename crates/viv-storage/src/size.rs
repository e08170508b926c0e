//! Disk sizes as users write them: `20G`, `512M`, `1T`, `10GiB` or a number of bytes.
//!
//! Units are binary (K = 1024, as `qemu-img` reads them); fractions are refused. Invariant: a
//! size that [`check_disk_size`] accepts is non-zero, a multiple of 512 (a sector) and at most
//! [`MAX_DISK_SIZE`].

/// The largest disk the pool creates: 64 TiB.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional unit.
    #[error("'{0}' is not a size; write a whole number of bytes or one with a unit: 512M, 20G, 1T")]
    Syntax(String),
    /// Zero.
    #[error("a disk size must be larger than zero")]
    Zero,
    /// Above the maximum (or beyond 64 bits).
    #[error("{0} is larger than the largest disk allowed ({MAX_DISK_SIZE} bytes, 64 TiB)")]
    TooLarge(String),
    /// Not whole sectors.
    #[error("{0} bytes is not a multiple of 512 (a disk sector); round it, e.g. to {1}")]
    NotSectorMultiple(u64, u64),
}

/// Parses a size (see the module doc) into bytes, without range checks.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::Syntax(text.into()));
    }
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(SizeError::Syntax(text.into())),
    };
    let number: u64 = digits.parse().map_err(|_| SizeError::TooLarge(text.trim().into()))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.trim().into()))
}

/// Checks that `bytes` is a size a new disk may have.
pub fn check_disk_size(bytes: u64) -> Result<u64, SizeError> {
    if bytes == 0 {
        return Err(SizeError::Zero);
    }
    if bytes > MAX_DISK_SIZE {
        return Err(SizeError::TooLarge(format!("{bytes} bytes")));
    }
    if !bytes.is_multiple_of(512) {
        return Err(SizeError::NotSectorMultiple(bytes, bytes.div_ceil(512) * 512));
    }
    Ok(bytes)
}

/// Parses and checks a disk size in one step.
pub fn parse_disk_size(text: &str) -> Result<u64, SizeError> {
    check_disk_size(parse_size(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size(" 1 T "), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
    }

    #[test]
    fn refuses_nonsense() {
        for text in ["", "G", "1.5G", "-1G", "20X", "20GG", "0x10", "+5"] {
            assert!(matches!(parse_size(text), Err(SizeError::Syntax(_))), "{text}");
        }
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(parse_size("20000000P"), Err(SizeError::TooLarge(_))));
    }

    #[test]
    fn refuses_impossible_disks() {
        assert_eq!(parse_disk_size("0"), Err(SizeError::Zero));
        assert_eq!(parse_disk_size("0G"), Err(SizeError::Zero));
        assert_eq!(parse_disk_size("1000"), Err(SizeError::NotSectorMultiple(1000, 1024)));
        assert!(matches!(parse_disk_size("65T"), Err(SizeError::TooLarge(_))));
        assert_eq!(parse_disk_size("64T"), Ok(MAX_DISK_SIZE));
    }
}
