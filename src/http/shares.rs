//! Per-caller shares of what is bounded server-wide: one consumer token may hold only
//! so many snapshot reads at once, however many the pool's read share has room for, so
//! one slow or greedy consumer cannot take them all from the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind};

/// How many places each caller holds now, against a cap per caller.
pub(crate) struct CallerShares {
    per_caller: usize,
    held: Mutex<HashMap<String, usize>>,
    what: &'static str,
}

impl CallerShares {
    /// `what`: the places, in the refusal's words ("snapshot reads").
    pub fn new(per_caller: usize, what: &'static str) -> Arc<CallerShares> {
        Arc::new(CallerShares { per_caller: per_caller.max(1), held: Mutex::default(), what })
    }

    /// A place for `caller` (a [`super::auth::Principal::quota_key`]; none: no cap),
    /// given back when the returned guard is dropped; 429 when its share is in use.
    pub(crate) fn enter(self: &Arc<Self>, caller: Option<String>) -> Result<Place, Error> {
        let Some(caller) = caller else { return Ok(Place { shares: None, caller: String::new() }) };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(caller.clone()).or_default();
        if *n >= self.per_caller {
            return Err(Error::new(
                ErrorKind::TooMany,
                format!(
                    "this token has {} {} under way, as many as one token may: finish one first",
                    self.per_caller, self.what
                ),
            ));
        }
        *n += 1;
        Ok(Place { shares: Some(Arc::clone(self)), caller })
    }
}

/// A caller's place; dropping it gives the place back.
pub(crate) struct Place {
    shares: Option<Arc<CallerShares>>,
    caller: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(shares) = &self.shares else { return };
        let mut held = shares.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_holds_its_share_and_gets_it_back() {
        let shares = CallerShares::new(2, "snapshot reads");
        let a1 = shares.enter(Some("a".into())).unwrap();
        let _a2 = shares.enter(Some("a".into())).unwrap();
        let refused = shares.enter(Some("a".into())).err().unwrap();
        assert_eq!(refused.kind, ErrorKind::TooMany);
        let _b = shares.enter(Some("b".into())).unwrap();
        let _admins: Vec<Place> = (0..10).map(|_| shares.enter(None).unwrap()).collect();
        drop(a1);
        let _a3 = shares.enter(Some("a".into())).unwrap();
        drop((_a2, _a3));
        assert!(shares.held.lock().unwrap().get("a").is_none());
    }
}
