//! `cis490 export EPISODE... --to DIR`: complete episodes as files of the
//! Parquet dataset, each written atomically. The same episode always gives
//! the same bytes, so exporting twice changes nothing.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use super::{
    Episode, is_complete,
    schema::{self, SIDE_TABLES},
};
use crate::episode::{DONE, write_atomic};

/// One file of the dataset: its path relative to the dataset root (`/`
/// separated; also the object key under a shipping prefix) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetFile {
    pub key: String,
    pub bytes: Vec<u8>,
}

/// Every dataset file of an episode: `episodes/`, `events/`, `labels/`
/// (partitioned by `date=`/`host=`), and per source `telemetry/` and the
/// four side tables (partitioned by `source=`/`date=`/`host=`).
pub fn build(ep: &Episode) -> Result<Vec<DatasetFile>> {
    let (id, date, host) = (ep.id(), ep.date(), ep.host());
    let file = |table: &str, source: Option<&str>, batch| -> Result<DatasetFile> {
        let source = source.map(|s| format!("source={s}/")).unwrap_or_default();
        Ok(DatasetFile {
            key: format!("{table}/{source}date={date}/host={host}/{id}.parquet"),
            bytes: schema::parquet_bytes(&batch).with_context(|| format!("{table} of {id}"))?,
        })
    };
    let mut out = vec![
        file("episodes", None, schema::episode_batch(ep)?)?,
        file("events", None, schema::events_batch(id, &ep.events)?)?,
        file("labels", None, schema::labels_batch(id, &ep.labels)?)?,
    ];
    for (source, rows) in &ep.rows {
        out.push(file(
            "telemetry",
            Some(source.name()),
            schema::telemetry_batch(rows)?,
        )?);
        for t in &SIDE_TABLES {
            out.push(file(
                t.name,
                Some(source.name()),
                schema::side_batch(t, rows)?,
            )?);
        }
    }
    Ok(out)
}

/// Writes `f` under `root` atomically (temp file, fsync, rename); a file
/// with the same bytes already there is left alone. Returns whether it
/// wrote.
pub fn write_file(root: &Path, f: &DatasetFile) -> Result<bool> {
    let path = root.join(&f.key);
    if fs::read(&path).is_ok_and(|old| old == f.bytes) {
        return Ok(false);
    }
    let dir = path.parent().expect("a key has directories");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomic(&path, &f.bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(true)
}

/// `cis490 export`: checks first that every episode is complete (an
/// incomplete one fails the command before anything is written), then
/// exports each, with a progress line per episode on stderr.
pub fn run(episodes: &[PathBuf], to: &Path) -> Result<()> {
    if let Some(dir) = episodes.iter().find(|d| !d.is_dir()) {
        anyhow::bail!(
            "{} is not an episode directory: nothing exported",
            dir.display()
        );
    }
    if let Some(dir) = episodes.iter().find(|d| !is_complete(d)) {
        anyhow::bail!(
            "{} is not a complete episode (no {DONE}; still being traced, or the trace failed): \
             nothing exported",
            dir.display()
        );
    }
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for (i, dir) in episodes.iter().enumerate() {
        let ep = Episode::read(dir)?;
        let files = build(&ep)?;
        let mut written = 0;
        for f in &files {
            written += usize::from(write_file(to, f)?);
        }
        let bytes: usize = files.iter().map(|f| f.bytes.len()).sum();
        let rows: usize = ep.rows.iter().map(|(_, r)| r.len()).sum();
        eprintln!(
            "export [{}/{}] {}: {rows} rows, {} files ({written} new or changed), {bytes} bytes",
            i + 1,
            episodes.len(),
            ep.id(),
            files.len(),
        );
    }
    Ok(())
}
