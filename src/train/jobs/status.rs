//! A job's life as a state machine: its statuses, the stop a running job has been asked for,
//! and — in one table each — what a user's command does in every state ([`decide`]) and
//! which status a run that ended settles in ([`settle`]). The manager applies both under its
//! one lock, so two commands never decide from the same stale state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for the runner (new, resumed, or re-queued).
    Queued,
    /// Training now (a pause or cancel it was asked for takes effect at the next step).
    Running,
    /// Held by a user at a step boundary, its checkpoint saved; `resume` queues it again.
    Paused,
    /// Trained to the last step; its model is registered.
    Completed,
    /// Stopped by an error (in `error`).
    Failed,
    /// Stopped by a user for good.
    Cancelled,
    /// Stopped by the server going down (cleanly or not); `resume` continues it.
    Interrupted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Interrupted => "interrupted",
        }
    }

    /// No command changes it any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown job status `{s}`"))
    }
}

/// The stop a running job has been asked for, honoured at its next step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    None = 0,
    Pause = 1,
    Cancel = 2,
}

impl StopRequest {
    pub const ALL: [StopRequest; 3] = [StopRequest::None, StopRequest::Pause, StopRequest::Cancel];

    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => StopRequest::Pause,
            2 => StopRequest::Cancel,
            _ => StopRequest::None,
        }
    }
}

/// What a user can ask of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Cancel,
}

impl Command {
    pub const ALL: [Command; 3] = [Command::Pause, Command::Resume, Command::Cancel];
}

/// What a command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Already so: nothing changes (commands are idempotent).
    Nothing,
    /// The job (not running) takes this status now.
    Become(JobStatus),
    /// The running job's stop request becomes this (`None` withdraws a pending pause).
    Request(StopRequest),
}

/// The transition table: what `command` does to a job in `status` whose pending stop request
/// (meaningful only while running) is `pending`; `Err` says why it is refused (409).
pub fn decide(status: JobStatus, pending: StopRequest, command: Command) -> Result<Effect, String> {
    use Command as C;
    use Effect::*;
    use JobStatus as S;
    use StopRequest as R;
    let refuse = |why: &str| Err(format!("a {status} job cannot be {why}"));
    match (status, command) {
        (S::Queued, C::Pause) => Ok(Become(S::Paused)),
        (S::Queued, C::Resume) => Ok(Nothing),
        (S::Queued, C::Cancel) => Ok(Become(S::Cancelled)),

        (S::Running, C::Pause) => match pending {
            R::None => Ok(Request(R::Pause)),
            R::Pause => Ok(Nothing),
            R::Cancel => Err("the job is being cancelled: it cannot be paused".into()),
        },
        (S::Running, C::Resume) => match pending {
            // A pause not yet honoured is withdrawn: the job goes on running.
            R::Pause => Ok(Request(R::None)),
            R::None => Ok(Nothing),
            R::Cancel => Err("the job is being cancelled: it cannot be resumed".into()),
        },
        // A cancel overrides a pending pause.
        (S::Running, C::Cancel) => match pending {
            R::Cancel => Ok(Nothing),
            R::None | R::Pause => Ok(Request(R::Cancel)),
        },

        (S::Paused, C::Pause) => Ok(Nothing),
        (S::Paused, C::Resume) => Ok(Become(S::Queued)),
        (S::Paused, C::Cancel) => Ok(Become(S::Cancelled)),

        (S::Interrupted, C::Pause) => Ok(Become(S::Paused)),
        (S::Interrupted, C::Resume) => Ok(Become(S::Queued)),
        (S::Interrupted, C::Cancel) => Ok(Become(S::Cancelled)),

        (S::Cancelled, C::Cancel) => Ok(Nothing),
        (S::Cancelled, C::Pause) => refuse("paused"),
        (S::Cancelled, C::Resume) => refuse("resumed"),
        (S::Completed | S::Failed, C::Pause) => refuse("paused"),
        (S::Completed | S::Failed, C::Resume) => refuse("resumed"),
        (S::Completed | S::Failed, C::Cancel) => refuse("cancelled"),
    }
}

/// How a run ended, as the runner saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Every step done and the model registered.
    Finished,
    /// An error (training, or registering the model).
    Error,
    /// Stopped early at a step boundary because a stop was requested.
    Stopped,
}

/// The status a run settles in, decided under the manager's lock from the stop request
/// pending *then* (a command may have changed it after the runner stopped: a resume that
/// withdrew the pause re-queues the job) and whether the server is shutting down.
pub fn settle(end: RunEnd, pending: StopRequest, shutting_down: bool) -> JobStatus {
    match end {
        RunEnd::Finished => JobStatus::Completed,
        RunEnd::Error => JobStatus::Failed,
        RunEnd::Stopped => match pending {
            StopRequest::Cancel => JobStatus::Cancelled,
            _ if shutting_down => JobStatus::Interrupted,
            StopRequest::Pause => JobStatus::Paused,
            StopRequest::None => JobStatus::Queued,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies a command to (status, pending) as the manager does.
    fn apply(s: JobStatus, p: StopRequest, c: Command) -> Option<(JobStatus, StopRequest)> {
        match decide(s, p, c).ok()? {
            Effect::Nothing => Some((s, p)),
            Effect::Become(t) => Some((t, StopRequest::None)),
            Effect::Request(r) => Some((s, r)),
        }
    }

    fn states() -> Vec<(JobStatus, StopRequest)> {
        let mut v = Vec::new();
        for s in JobStatus::ALL {
            if s == JobStatus::Running {
                v.extend(StopRequest::ALL.map(|p| (s, p)));
            } else {
                v.push((s, StopRequest::None));
            }
        }
        v
    }

    /// Where a job in (status, pending) ends up when its run stops at the next boundary
    /// (or, not running, where it is).
    fn outcome(s: JobStatus, p: StopRequest) -> JobStatus {
        if s == JobStatus::Running && p != StopRequest::None {
            settle(RunEnd::Stopped, p, false)
        } else {
            s
        }
    }

    #[test]
    fn statuses_round_trip_through_text() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("stopped".parse::<JobStatus>().is_err());
    }

    /// Every state, every ordered pair of commands: the last command the job accepted decides
    /// where it ends — cancel-then-pause never ends paused, pause-then-resume never ends
    /// paused — and a final status never changes.
    #[test]
    fn every_pair_of_commands_ends_where_the_last_accepted_one_says() {
        for (s, p) in states() {
            for first in Command::ALL {
                for second in Command::ALL {
                    let mut state = (s, p);
                    let mut last = None;
                    for c in [first, second] {
                        if let Some(next) = apply(state.0, state.1, c) {
                            state = next;
                            last = Some(c);
                        }
                    }
                    let end = outcome(state.0, state.1);
                    let what = format!("{s}/{p:?}: {first:?} then {second:?} → {end}");
                    if s.is_final() {
                        assert_eq!(end, s, "{what}");
                        continue;
                    }
                    match last {
                        Some(Command::Cancel) => assert_eq!(end, JobStatus::Cancelled, "{what}"),
                        Some(Command::Pause) => assert_eq!(end, JobStatus::Paused, "{what}"),
                        Some(Command::Resume) => assert!(
                            matches!(end, JobStatus::Queued | JobStatus::Running),
                            "{what}"
                        ),
                        None => assert_eq!(end, outcome(s, p), "{what}"),
                    }
                    // Once a cancel is accepted nothing but cancel is.
                    if first == Command::Cancel && apply(s, p, first).is_some() {
                        assert_eq!(end, JobStatus::Cancelled, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn commands_are_idempotent() {
        for (s, p) in states() {
            for c in Command::ALL {
                if let Some(once) = apply(s, p, c) {
                    assert_eq!(
                        apply(once.0, once.1, c),
                        Some(once),
                        "{s}/{p:?} {c:?} twice"
                    );
                }
            }
        }
    }

    #[test]
    fn a_run_settles_by_the_request_pending_when_it_stops() {
        use StopRequest as R;
        assert_eq!(
            settle(RunEnd::Stopped, R::Cancel, true),
            JobStatus::Cancelled
        );
        assert_eq!(settle(RunEnd::Stopped, R::Pause, false), JobStatus::Paused);
        assert_eq!(
            settle(RunEnd::Stopped, R::Pause, true),
            JobStatus::Interrupted
        );
        // Paused, then resumed before the runner settled: it runs again.
        assert_eq!(settle(RunEnd::Stopped, R::None, false), JobStatus::Queued);
        assert_eq!(
            settle(RunEnd::Finished, R::Cancel, false),
            JobStatus::Completed
        );
        assert_eq!(settle(RunEnd::Error, R::None, false), JobStatus::Failed);
    }
}
