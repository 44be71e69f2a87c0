//! `/proc/PID/io`: bytes the process caused to be read from or written to
//! storage (whole process, exited threads included).

use anyhow::{Context as _, Result};

/// The storage counters of `/proc/PID/io`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoBytes {
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// Parses the `read_bytes:` and `write_bytes:` lines.
pub fn parse_io(s: &str) -> Result<IoBytes> {
    let field = |name: &str| -> Result<u64> {
        let v = s
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("io: no {name}"))?;
        v.trim()
            .parse()
            .with_context(|| format!("io: bad {name} {v:?}"))
    };
    Ok(IoBytes {
        read_bytes: field("read_bytes")?,
        write_bytes: field("write_bytes")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_storage_bytes_not_rchar() {
        let s = "rchar: 100\nwchar: 200\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(
            parse_io(s).unwrap(),
            IoBytes {
                read_bytes: 4096,
                write_bytes: 8192
            }
        );
        assert!(parse_io("rchar: 1\n").is_err());
        assert!(parse_io("read_bytes: x\nwrite_bytes: 1\n").is_err());
    }
}
