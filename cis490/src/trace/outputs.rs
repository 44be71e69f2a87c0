//! The open output files of an episode: `events.jsonl`, `labels.jsonl` and
//! one `telemetry-<source>.jsonl` per source.

use anyhow::{Context as _, Result};

use crate::{
    clock::ClockPair,
    episode::{self, EpisodeDir, JsonlFile},
    event::{Event, EventLine, LabelLine},
    row::SourceKind,
};

/// The open output files of an episode.
pub(super) struct Outputs {
    pub(super) events: JsonlFile,
    labels: JsonlFile,
    pub(super) rows: Vec<(SourceKind, JsonlFile)>,
}

impl Outputs {
    /// Creates the episode's files for the sources `kinds`.
    pub(super) fn create(episode: &EpisodeDir, kinds: &[SourceKind]) -> Result<Self> {
        Ok(Self {
            events: JsonlFile::create(&episode.file(episode::EVENTS))?,
            labels: JsonlFile::create(&episode.file(episode::LABELS))?,
            rows: kinds
                .iter()
                .map(|&k| Ok((k, JsonlFile::create(&episode.file(&k.file_name()))?)))
                .collect::<Result<_>>()?,
        })
    }

    pub(super) fn event(
        &mut self,
        at: ClockPair,
        seq: Option<u64>,
        event: Event<'_>,
    ) -> Result<()> {
        self.events
            .write(&EventLine::new(at, seq, event))
            .context("cannot write events.jsonl")
    }

    /// Writes a phase label now (flushed at once: an orchestrator may read it).
    pub(super) fn label(
        &mut self,
        at: ClockPair,
        seq: Option<u64>,
        label: &str,
        via: &str,
    ) -> Result<()> {
        self.labels
            .write(&LabelLine {
                t_mono_ns: at.mono_ns,
                t_wall_ns: at.wall_ns,
                seq,
                label,
                via,
            })
            .context("cannot write labels.jsonl")?;
        self.labels.flush().context("cannot write labels.jsonl")?;
        Ok(())
    }

    /// Flushes every file; an error names the file (a full disk shows
    /// here, where buffered lines reach it).
    pub(super) fn flush(&mut self) -> Result<()> {
        self.events.flush().context("cannot write events.jsonl")?;
        self.labels.flush().context("cannot write labels.jsonl")?;
        for (k, f) in &mut self.rows {
            f.flush()
                .with_context(|| format!("cannot write {}", k.file_name()))?;
        }
        Ok(())
    }

    pub(super) fn sync(&mut self) -> Result<()> {
        self.events.sync().context("cannot write events.jsonl")?;
        self.labels.sync().context("cannot write labels.jsonl")?;
        for (k, f) in &mut self.rows {
            f.sync()
                .with_context(|| format!("cannot write {}", k.file_name()))?;
        }
        Ok(())
    }
}
