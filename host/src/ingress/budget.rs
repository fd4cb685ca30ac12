//! The global budget of body bytes held before verification.
//!
//! Bodies are buffered whole before their signature is checked, by anyone who
//! can open a connection. The budget bounds what all of them together may hold:
//! a request reserves its declared length up front (or, chunked, each frame as
//! it arrives) and is refused when the budget is spent, before it is read. It
//! never waits for budget: waiting would let slow senders hold it for others.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Body bytes that may be in flight before verification, shared by all requests.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
}

/// Bytes one request holds of the budget; they return to it on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A budget of `bytes` (at most `u32::MAX`: the config checks it).
    pub fn new(bytes: usize) -> Self {
        BodyBudget {
            bytes: Arc::new(Semaphore::new(bytes)),
        }
    }

    /// Reserves `bytes` now, or `None` when the budget cannot spare them.
    pub fn reserve(&self, bytes: usize) -> Option<Reservation> {
        let mut r = Reservation {
            budget: self.bytes.clone(),
            permit: None,
        };
        r.grow_to(bytes).then_some(r)
    }

    /// Bytes not reserved by anyone.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Makes the reservation hold at least `total` bytes; false when the budget
    /// cannot spare the difference (what is held stays held).
    pub fn grow_to(&mut self, total: usize) -> bool {
        let more = total.saturating_sub(self.bytes());
        if more == 0 {
            return true;
        }
        let Ok(more) = u32::try_from(more) else {
            return false;
        };
        match self.budget.clone().try_acquire_many_owned(more) {
            Ok(p) => {
                match &mut self.permit {
                    Some(held) => held.merge(p),
                    None => self.permit = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_budget_and_return_on_drop() {
        let budget = BodyBudget::new(100);
        let mut a = budget.reserve(60).expect("fits");
        assert!(budget.reserve(50).is_none(), "60 + 50 > 100");
        assert!(a.grow_to(90));
        assert!(!a.grow_to(101));
        assert_eq!(a.bytes(), 90);
        assert_eq!(budget.available(), 10);
        drop(a);
        assert_eq!(budget.available(), 100);
        assert!(budget.reserve(0).is_some());
    }
}
