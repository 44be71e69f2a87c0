//! The episode directory: `DATA/episodes/<ULID>/` with `meta.json` (written
//! atomically), `events.jsonl`, `labels.jsonl`, one `telemetry-<source>.jsonl`
//! per source, and `done.marker`, written last and only for a complete
//! episode, so a shipper never picks up a half-written one.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

pub const META: &str = "meta.json";
pub const EVENTS: &str = "events.jsonl";
pub const LABELS: &str = "labels.jsonl";
pub const DONE: &str = "done.marker";

/// Files of an episode are readable by their owner and group only.
pub const FILE_MODE: u32 = 0o640;
/// And so is the directory.
pub const DIR_MODE: u32 = 0o750;

/// Creates a new file for writing: never an existing one, never through a
/// symlink, mode [`FILE_MODE`].
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory. A reader
/// sees the old content or the new one, never a torn file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// One JSON document per line, generic over the sink (a file, or a
/// `Vec<u8>` in tests).
pub struct JsonlWriter<W: Write> {
    out: W,
    lines: u64,
}

impl<W: Write> JsonlWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, lines: 0 }
    }

    /// Serializes `value` as one line.
    pub fn write<T: Serialize + ?Sized>(&mut self, value: &T) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, value).map_err(io::Error::from)?;
        self.out.write_all(b"\n")?;
        self.lines += 1;
        Ok(())
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn get_ref(&self) -> &W {
        &self.out
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A JSONL file in the episode directory.
pub type JsonlFile = JsonlWriter<BufWriter<File>>;

impl JsonlFile {
    pub fn create(path: &Path) -> Result<Self> {
        let f = create_new(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self::new(BufWriter::with_capacity(64 * 1024, f)))
    }

    /// Flushes and fsyncs.
    pub fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

/// An episode directory being written.
pub struct EpisodeDir {
    id: String,
    path: PathBuf,
}

impl EpisodeDir {
    /// Creates `data_dir/episodes/<ULID>/`. Fails with a one-line reason when
    /// the data directory cannot be written.
    /// The directory itself is created, never reused: an id that exists
    /// already (or a symlink in its place) is an error, not an overwrite.
    pub fn create(data_dir: &Path) -> Result<Self> {
        let id = ulid::Ulid::new().to_string();
        let episodes = data_dir.join("episodes");
        let path = episodes.join(&id);
        let fail = |e: io::Error| {
            anyhow::anyhow!("cannot create episode directory {}: {e}", path.display())
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&episodes)
            .map_err(fail)?;
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&path)
            .map_err(fail)?;
        Ok(Self { id, path })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `meta.json` atomically.
    pub fn write_meta<T: Serialize>(&self, meta: &T) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(meta)?;
        bytes.push(b'\n');
        write_atomic(&self.file(META), &bytes).context("cannot write meta.json")
    }

    /// Writes `done.marker`: call last, once everything else is synced.
    pub fn mark_done(&self) -> Result<()> {
        write_atomic(&self.file(DONE), b"").context("cannot write done.marker")
    }

    pub fn is_done(path: &Path) -> bool {
        path.join(DONE).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_writes_one_document_per_line() {
        let mut w = JsonlWriter::new(Vec::new());
        w.write(&serde_json::json!({"a": 1})).unwrap();
        w.write(&serde_json::json!({"b": "x\ny"})).unwrap();
        assert_eq!(w.lines(), 2);
        let out = String::from_utf8(w.into_inner()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, [r#"{"a":1}"#, r#"{"b":"x\ny"}"#]);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        write_atomic(&p, b"{\"v\":1}").unwrap();
        write_atomic(&p, b"{\"v\":2}").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{\"v\":2}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["meta.json"]);
    }

    #[test]
    fn atomic_write_failure_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        write_atomic(&p, b"old").unwrap();
        // A directory where the file should be renamed to makes rename fail.
        let blocked = dir.path().join("sub");
        fs::create_dir(&blocked).unwrap();
        fs::create_dir(blocked.join("x")).unwrap();
        assert!(write_atomic(&blocked.join("x"), b"new").is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(&blocked).unwrap().count(),
            1,
            "temp file removed"
        );
    }

    #[test]
    fn episode_dir_layout_and_done_marker() {
        let data = tempfile::tempdir().unwrap();
        let ep = EpisodeDir::create(data.path()).unwrap();
        assert_eq!(ep.id().len(), 26);
        assert_eq!(ep.path(), data.path().join("episodes").join(ep.id()));
        ep.write_meta(&serde_json::json!({"id": ep.id()})).unwrap();
        assert!(!EpisodeDir::is_done(ep.path()));
        ep.mark_done().unwrap();
        assert!(EpisodeDir::is_done(ep.path()));
        let meta: serde_json::Value =
            serde_json::from_slice(&fs::read(ep.file(META)).unwrap()).unwrap();
        assert_eq!(meta["id"], ep.id());
    }

    #[test]
    fn files_are_private_new_and_not_followed_through_symlinks() {
        use std::os::unix::fs::PermissionsExt as _;
        let data = tempfile::tempdir().unwrap();
        let ep = EpisodeDir::create(data.path()).unwrap();
        ep.write_meta(&serde_json::json!({})).unwrap();
        let mut w = JsonlFile::create(&ep.file("telemetry-x.jsonl")).unwrap();
        w.write(&1).unwrap();
        w.sync().unwrap();
        for f in [META, "telemetry-x.jsonl"] {
            let mode = fs::metadata(ep.file(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o027, 0, "{f} has mode {mode:o}");
        }
        let mode = fs::metadata(ep.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o027, 0, "dir mode {mode:o}");
        // An existing file is never reopened, a symlink never followed.
        assert!(JsonlFile::create(&ep.file("telemetry-x.jsonl")).is_err());
        let victim = data.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, ep.file("events.jsonl")).unwrap();
        assert!(JsonlFile::create(&ep.file("events.jsonl")).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        // A meta.json symlink is replaced by the rename, not written through.
        fs::remove_file(ep.file(META)).unwrap();
        std::os::unix::fs::symlink(&victim, ep.file(META)).unwrap();
        ep.write_meta(&serde_json::json!({"x": 1})).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn unwritable_data_dir_is_a_clear_error() {
        let data = tempfile::tempdir().unwrap();
        let file = data.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let err = EpisodeDir::create(&file).err().unwrap().to_string();
        assert!(err.starts_with("cannot create episode directory"), "{err}");
    }
}
