//! Time series reduced to what a chart can show: the minimum and the
//! maximum of every pixel column (so a one-bucket spike in an hour of 1 ms
//! buckets is still drawn), and log2 histograms summed per column.

/// One series over a fixed time span, as `n` columns of min/max.
#[derive(Debug, Clone)]
pub struct Columns {
    span_s: f64,
    min: Vec<f64>,
    max: Vec<f64>,
    /// A bucket in this column had no value (the source did not measure
    /// it then): the line is broken there unless the column has values.
    gap: Vec<bool>,
    /// Values added (not gaps).
    pub values: u64,
}

impl Columns {
    pub fn new(n: usize, span_s: f64) -> Self {
        let n = n.max(1);
        Self {
            span_s: if span_s > 0.0 { span_s } else { 1.0 },
            min: vec![f64::INFINITY; n],
            max: vec![f64::NEG_INFINITY; n],
            gap: vec![false; n],
            values: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.min.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values == 0
    }

    /// The column of time `t_s` (clamped to the span).
    pub fn column(&self, t_s: f64) -> usize {
        column(t_s, self.span_s, self.len())
    }

    /// Adds the value of a bucket ending at `t_s` (`None`: not measured).
    pub fn add(&mut self, t_s: f64, v: Option<f64>) {
        let c = self.column(t_s);
        match v {
            Some(v) if v.is_finite() => {
                self.min[c] = self.min[c].min(v);
                self.max[c] = self.max[c].max(v);
                self.values += 1;
            }
            _ => self.gap[c] = true,
        }
    }

    /// Per column: `Some((min, max))`, or `None` for a column with a gap
    /// and no value. Columns with neither are left out.
    pub fn points(&self) -> impl Iterator<Item = (usize, Option<(f64, f64)>)> + '_ {
        (0..self.len()).filter_map(|c| {
            if self.min[c] <= self.max[c] {
                Some((c, Some((self.min[c], self.max[c]))))
            } else if self.gap[c] {
                Some((c, None))
            } else {
                None
            }
        })
    }

    /// The largest value of the whole series.
    pub fn max_value(&self) -> Option<f64> {
        self.max
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .reduce(f64::max)
    }
}

/// The column of time `t_s` among `n` over `span_s`.
pub fn column(t_s: f64, span_s: f64, n: usize) -> usize {
    let x = (t_s / span_s * n as f64).floor();
    if x.is_nan() || x < 0.0 {
        0
    } else {
        (x as usize).min(n - 1)
    }
}

/// A log2 histogram field over time: per column, the element-wise sum.
#[derive(Debug, Clone)]
pub struct Heat {
    span_s: f64,
    pub cells: Vec<[u64; 64]>,
    /// Histogram elements past 64 (a malformed row), not drawn, counted.
    pub overflow: u64,
}

impl Heat {
    pub fn new(n: usize, span_s: f64) -> Self {
        Self {
            span_s: if span_s > 0.0 { span_s } else { 1.0 },
            cells: vec![[0; 64]; n.max(1)],
            overflow: 0,
        }
    }

    pub fn add(&mut self, t_s: f64, hist: &[u64]) {
        let c = column(t_s, self.span_s, self.cells.len());
        for (i, n) in hist.iter().enumerate() {
            if i < 64 {
                self.cells[c][i] = self.cells[c][i].saturating_add(*n);
            } else {
                self.overflow = self.overflow.saturating_add(*n);
            }
        }
    }

    /// The lowest and highest element with a count, if any.
    pub fn used_rows(&self) -> Option<(usize, usize)> {
        let mut lo = usize::MAX;
        let mut hi = 0;
        for col in &self.cells {
            for (i, n) in col.iter().enumerate() {
                if *n > 0 {
                    lo = lo.min(i);
                    hi = hi.max(i);
                }
            }
        }
        (lo <= hi).then_some((lo, hi))
    }

    pub fn max_count(&self) -> u64 {
        self.cells.iter().flatten().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_spike_among_millions_survives_downsampling() {
        // An hour at 1 ms: 3.6M buckets into 900 columns, 4000 per column.
        let n = 3_600_000u64;
        let mut c = Columns::new(900, 3600.0);
        for i in 0..n {
            let v = match i {
                1_234_567 => 1e9,
                2_000_001 => -5.0,
                _ => 10.0 + (i % 7) as f64,
            };
            c.add((i + 1) as f64 / 1000.0, Some(v));
        }
        assert_eq!(c.values, n);
        assert_eq!(c.max_value(), Some(1e9));
        let pts: Vec<_> = c.points().collect();
        assert_eq!(pts.len(), 900, "every column has values");
        let spike_col = c.column(1_234_568.0 / 1000.0);
        let dip_col = c.column(2_000_002.0 / 1000.0);
        assert_ne!(spike_col, dip_col);
        for (col, mm) in pts {
            let (lo, hi) = mm.unwrap();
            if col == spike_col {
                assert_eq!(hi, 1e9, "the spike is the max of its column");
                assert_eq!(lo, 10.0);
            } else if col == dip_col {
                assert_eq!(lo, -5.0, "the dip is the min of its column");
                assert_eq!(hi, 16.0);
            } else {
                assert_eq!((lo, hi), (10.0, 16.0), "column {col}");
            }
        }
    }

    #[test]
    fn gaps_break_only_columns_without_values() {
        let mut c = Columns::new(10, 10.0);
        c.add(0.5, Some(1.0));
        c.add(1.5, None);
        c.add(2.5, None);
        c.add(2.6, Some(3.0));
        let pts: Vec<_> = c.points().collect();
        assert_eq!(
            pts,
            vec![(0, Some((1.0, 1.0))), (1, None), (2, Some((3.0, 3.0)))]
        );
        // Out-of-span times clamp instead of panicking.
        c.add(-1.0, Some(0.0));
        c.add(1e12, Some(7.0));
        c.add(f64::NAN, Some(2.0));
        assert_eq!(c.max_value(), Some(7.0));
    }

    #[test]
    fn heat_sums_per_column_and_counts_overflow() {
        let mut h = Heat::new(4, 4.0);
        h.add(0.1, &[1, 0, 2]);
        h.add(0.2, &[0, 0, 3]);
        h.add(3.9, &[0; 70].iter().copied().chain([5]).collect::<Vec<_>>());
        assert_eq!(h.cells[0][2], 5);
        assert_eq!(h.overflow, 5);
        assert_eq!(h.used_rows(), Some((0, 2)));
        assert_eq!(h.max_count(), 5);
    }
}
