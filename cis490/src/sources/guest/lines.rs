//! Splits the agent's byte stream into lines without ever holding more than
//! a line's cap: a longer line is dropped as it streams in and reported with
//! its length once its newline arrives.

/// What [`Splitter::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A complete line (without its newline), at most the cap.
    Line(&'a [u8]),
    /// A line longer than the cap, discarded; its length in bytes.
    TooLong(u64),
}

pub struct Splitter {
    buf: Vec<u8>,
    cap: usize,
    /// Bytes of the current over-long line seen so far.
    discarding: Option<u64>,
}

impl Splitter {
    pub fn new(cap: usize) -> Self {
        Self {
            // Allocated once: `buf` never holds more than `cap`.
            buf: Vec::with_capacity(cap),
            cap,
            discarding: None,
        }
    }

    /// Feeds bytes; calls `f` with every line they complete.
    pub fn feed(&mut self, mut data: &[u8], mut f: impl FnMut(Piece<'_>)) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let chunk = &data[..pos];
            data = &data[pos + 1..];
            if let Some(n) = self.discarding.take() {
                f(Piece::TooLong(n + chunk.len() as u64));
            } else if self.buf.len() + chunk.len() > self.cap {
                f(Piece::TooLong((self.buf.len() + chunk.len()) as u64));
                self.buf.clear();
            } else if self.buf.is_empty() {
                f(Piece::Line(chunk));
            } else {
                self.buf.extend_from_slice(chunk);
                f(Piece::Line(&self.buf));
                self.buf.clear();
            }
        }
        if let Some(n) = &mut self.discarding {
            *n += data.len() as u64;
        } else if self.buf.len() + data.len() > self.cap {
            self.discarding = Some((self.buf.len() + data.len()) as u64);
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(data);
        }
    }

    /// The bytes of an unfinished line (cut when the peer hangs up), and
    /// forgets them.
    pub fn take_partial(&mut self) -> Option<u64> {
        let n = self.discarding.take().unwrap_or(self.buf.len() as u64);
        self.buf.clear();
        (n > 0).then_some(n)
    }

    /// Bytes held (at most the cap).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut Splitter, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        s.feed(data, |p| {
            out.push(match p {
                Piece::Line(l) => String::from_utf8_lossy(l).into_owned(),
                Piece::TooLong(n) => format!("<{n}>"),
            })
        });
        out
    }

    #[test]
    fn lines_across_reads() {
        let mut s = Splitter::new(8);
        assert_eq!(run(&mut s, b"ab\ncd"), ["ab"]);
        assert_eq!(run(&mut s, b"ef\n\ngh"), ["cdef", ""]);
        assert_eq!(s.take_partial(), Some(2));
        assert_eq!(s.take_partial(), None);
    }

    #[test]
    fn a_long_line_is_cut_and_measured_without_being_held() {
        let mut s = Splitter::new(8);
        assert_eq!(run(&mut s, b"12345678\n"), ["12345678"], "at the cap");
        assert_eq!(run(&mut s, b"123456789\nok\n"), ["<9>", "ok"]);
        assert_eq!(run(&mut s, b"12345"), Vec::<String>::new());
        for _ in 0..1000 {
            assert_eq!(run(&mut s, &[b'x'; 4096]), Vec::<String>::new());
            assert!(s.held() <= 8);
        }
        assert_eq!(
            run(&mut s, b"yy\nz\n"),
            [format!("<{}>", 5 + 4096 * 1000 + 2), "z".into()]
        );
        run(&mut s, &[b'x'; 20]);
        assert_eq!(
            s.take_partial(),
            Some(20),
            "an over-long line cut by a hang-up"
        );
    }
}
