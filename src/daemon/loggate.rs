//! A per-user budget for the log lines a local client can cause at will (refused connections,
//! bad frames, starts that are not valid). Any user may connect to the daemon's socket: without
//! a budget one of them could flood the journal, whose own rate limit is per service and would
//! then drop the lines about everyone else's sessions too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one user's connections may cause per window before the rest of the window is quiet.
pub const PER_WINDOW: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Users tracked at once; beyond it, windows that have ended are forgotten first.
const MAX_USERS: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log the line; `suppressed` lines of this user's were not logged before it.
    Log { suppressed: u64 },
    /// Log the line, and say that this user's next lines are not logged until the window ends.
    Last,
    /// Do not log.
    Quiet,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

#[derive(Default)]
pub struct LogGate {
    users: Mutex<HashMap<u32, Window>>,
}

impl LogGate {
    pub fn admit(&self, uid: u32) -> Admit {
        self.admit_at(uid, Instant::now())
    }

    fn admit_at(&self, uid: u32, now: Instant) -> Admit {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if users.len() >= MAX_USERS && !users.contains_key(&uid) {
            users.retain(|_, w| now.duration_since(w.start) < WINDOW);
            if users.len() >= MAX_USERS {
                // Every tracked user is inside a window: this one shares the busiest fate.
                return Admit::Quiet;
            }
        }
        let w = users.entry(uid).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        let mut suppressed = 0;
        if now.duration_since(w.start) >= WINDOW {
            suppressed = w.suppressed;
            *w = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged >= PER_WINDOW {
            w.suppressed += 1;
            return Admit::Quiet;
        }
        w.logged += 1;
        if w.logged == PER_WINDOW {
            Admit::Last
        } else {
            Admit::Log { suppressed }
        }
    }
}

/// `tracing::warn!` for a line that user `uid`'s connection caused, within [`LogGate`]'s budget.
macro_rules! client_warn {
    ($gate:expr, $uid:expr, $($arg:tt)+) => {
        match $gate.admit($uid) {
            $crate::daemon::loggate::Admit::Log { suppressed } => {
                if suppressed > 0 {
                    tracing::warn!(uid = $uid, suppressed, "lines about this user's connections were not logged in the last minute");
                }
                tracing::warn!($($arg)+);
            }
            $crate::daemon::loggate::Admit::Last => {
                tracing::warn!($($arg)+);
                tracing::warn!(uid = $uid, "this user's connections keep going wrong: no more lines about them for up to a minute");
            }
            $crate::daemon::loggate::Admit::Quiet => {}
        }
    };
}
pub(crate) use client_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_a_budget_per_window_and_hears_what_was_left_out() {
        let g = LogGate::default();
        let t0 = Instant::now();
        for i in 1..PER_WINDOW {
            assert_eq!(g.admit_at(7, t0), Admit::Log { suppressed: 0 }, "{i}");
        }
        assert_eq!(g.admit_at(7, t0), Admit::Last);
        for _ in 0..100 {
            assert_eq!(g.admit_at(7, t0 + Duration::from_secs(1)), Admit::Quiet);
        }
        // Another user is not held up by the first one's flood.
        assert_eq!(g.admit_at(8, t0), Admit::Log { suppressed: 0 });
        // The next window starts by saying how many were left out.
        assert_eq!(g.admit_at(7, t0 + WINDOW), Admit::Log { suppressed: 100 });
        assert_eq!(g.admit_at(7, t0 + WINDOW), Admit::Log { suppressed: 0 });
    }

    #[test]
    fn users_tracked_are_bounded() {
        let g = LogGate::default();
        let t0 = Instant::now();
        for uid in 0..MAX_USERS as u32 {
            g.admit_at(uid, t0);
        }
        assert_eq!(g.admit_at(u32::MAX, t0), Admit::Quiet);
        // Once their windows have ended, old users make room.
        assert_eq!(
            g.admit_at(u32::MAX, t0 + WINDOW),
            Admit::Log { suppressed: 0 }
        );
        assert_eq!(g.users.lock().unwrap().len(), 1);
    }
}
