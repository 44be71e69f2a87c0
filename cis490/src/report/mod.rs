//! `cis490 report EPISODE [-o FILE]`: one self-contained HTML page of an
//! episode (no scripts, no network, no external fonts).
//!
//! The rows are read once, streaming ([`crate::summary::episode_totals`]
//! visits each row while it computes the totals table), into per-pixel-column
//! minima and maxima ([`series`]), so the page's size does not grow with the
//! episode's length: every bound below is a count of columns, series, lanes
//! or list rows, and `MAX_PAGE_BYTES` holds for any episode (tested with an
//! adversarial one).

mod ingest;
mod page;
pub mod series;
pub mod svg;

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::{episode::write_atomic, summary};

/// The default file name, in the episode directory.
pub const FILE: &str = "report.html";

/// The page stays under this size whatever the episode (stated in `--help`
/// and the README; `tests::an_adversarial_episode_stays_under_the_bound`).
pub const MAX_PAGE_BYTES: usize = 8 << 20;

/// Renders the report of the episode in `dir` as HTML.
pub fn render(dir: &Path) -> Result<String> {
    let meta = crate::meta::Meta::read(dir)?;
    let mut ing = ingest::Ingest::new(dir, &meta);
    let mut rows = 0u64;
    let t0 = std::time::Instant::now();
    let mut next_progress = 5.0;
    // `cis490 check` reads the rows too: on a second thread, meanwhile.
    let (totals, check) = std::thread::scope(|s| {
        let check = s.spawn(|| crate::check::check(dir));
        let totals = summary::episode_totals(dir, &mut |source, row| {
            ing.add(source, row);
            rows += 1;
            if rows.is_multiple_of(65536) && t0.elapsed().as_secs_f64() >= next_progress {
                eprintln!("report: {rows} rows read");
                next_progress += 5.0;
            }
        });
        let check = check
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("cis490 check panicked")));
        (totals, check)
    });
    let (totals, check) = (totals?, check?);
    let events = ingest::read_events(dir);
    Ok(page::page(&meta, &totals, &check, &ing, &events))
}

/// Writes the report of `dir` to `out` atomically; returns its size.
pub fn write(dir: &Path, out: &Path) -> Result<usize> {
    let html = render(dir)?;
    write_atomic(out, html.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(html.len())
}

#[cfg(test)]
mod tests;
