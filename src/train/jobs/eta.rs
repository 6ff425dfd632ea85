//! A job's time to completion (`eta_s`), smoothed so that it counts down instead of jumping.
//!
//! It used to be (time since the run started) / (steps done) × (steps left): zero after the
//! first step (no time counted yet), then jumping with each evaluation, and rising between
//! steps. Now each step's duration feeds an exponential moving average (an evaluation's slow
//! step moves it by a fraction), and between steps the estimate counts down from the last
//! step's moment.

use std::time::Instant;

/// Weight of the newest step's duration in the average.
const ALPHA: f64 = 0.2;

#[derive(Debug, Default, Clone)]
pub struct Eta {
    /// The last step reported and when.
    last: Option<(u64, Instant)>,
    /// Seconds per step, smoothed; `None` until two steps were seen.
    per_step: Option<f64>,
}

impl Eta {
    /// Step `step` finished at `at`.
    pub fn step(&mut self, step: u64, at: Instant) {
        if let Some((prev, prev_at)) = self.last {
            if step > prev {
                let sample = at.duration_since(prev_at).as_secs_f64() / (step - prev) as f64;
                self.per_step = Some(match self.per_step {
                    None => sample,
                    Some(avg) => avg + ALPHA * (sample - avg),
                });
            }
        }
        self.last = Some((step, at));
    }

    /// Seconds until step `total` at `now`; `None` before there is a step duration to go by.
    pub fn seconds_left(&self, total: u64, now: Instant) -> Option<f64> {
        let (step, at) = self.last?;
        let per_step = self.per_step?;
        let left = total.saturating_sub(step) as f64 * per_step
            - now.saturating_duration_since(at).as_secs_f64();
        Some(left.max(0.0).round())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_down_between_steps_and_damps_a_slow_step() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let mut eta = Eta::default();
        eta.step(1, s(0.0));
        assert_eq!(eta.seconds_left(100, s(0.0)), None, "no duration yet");
        for step in 2..=10 {
            eta.step(step, s((step - 1) as f64 * 2.0));
        }
        // 90 steps of 2 s left, then counting down while step 11 runs.
        assert_eq!(eta.seconds_left(100, s(18.0)), Some(180.0));
        assert_eq!(eta.seconds_left(100, s(19.0)), Some(179.0));
        // An evaluation makes step 11 take 12 s: the estimate moves by a fifth of the excess
        // per step (2 s → 4 s), not to 12 s per step.
        eta.step(11, s(30.0));
        assert_eq!(eta.seconds_left(100, s(30.0)), Some(356.0));
        // And it comes back as normal steps follow.
        for step in 12..=30 {
            eta.step(step, s(30.0 + (step - 11) as f64 * 2.0));
        }
        let left = eta.seconds_left(100, s(68.0)).unwrap();
        assert!((140.0..=145.0).contains(&left), "{left}");
        // Never negative past the expected end.
        assert_eq!(eta.seconds_left(31, s(500.0)), Some(0.0));
    }
}
