//! The global budget of body bytes held before verification.
//!
//! Bodies are buffered whole before their signature is checked, by anyone who
//! can open a connection. The budget bounds what all of them together may hold:
//! a request reserves its declared length up front (or, chunked, each frame as
//! it arrives) and is refused when the budget is spent, before it is read. It
//! never waits for budget: waiting would let slow senders hold it for others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ingress::shield::ClientKey;

/// Body bytes that may be in flight before verification, shared by all
/// requests, with a share per client so one client cannot hold all of it.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    per_client: usize,
    held: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

/// Bytes one request holds of the budget; they return to it on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: BodyBudget,
    client: ClientKey,
    permit: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A budget of `bytes` (at most `u32::MAX`: the config checks it), of
    /// which one client may hold at most `per_client`.
    pub fn new(bytes: usize, per_client: usize) -> Self {
        BodyBudget {
            bytes: Arc::new(Semaphore::new(bytes)),
            per_client,
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Reserves `bytes` for `client` now, or `None` when the budget or the
    /// client's share cannot spare them.
    pub fn reserve(&self, client: ClientKey, bytes: usize) -> Option<Reservation> {
        let mut r = Reservation {
            budget: self.clone(),
            client,
            permit: None,
        };
        r.grow_to(bytes).then_some(r)
    }

    /// Bytes not reserved by anyone.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, usize>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Makes the reservation hold at least `total` bytes; false when the
    /// budget or the client's share cannot spare the difference (what is
    /// held stays held).
    pub fn grow_to(&mut self, total: usize) -> bool {
        let more = total.saturating_sub(self.bytes());
        if more == 0 {
            return true;
        }
        let Ok(more_u32) = u32::try_from(more) else {
            return false;
        };
        let budget = self.budget.clone();
        let mut held = budget.held();
        let client_holds = held.get(&self.client).copied().unwrap_or(0);
        if client_holds + more > budget.per_client {
            return false;
        }
        match budget.bytes.clone().try_acquire_many_owned(more_u32) {
            Ok(p) => {
                match &mut self.permit {
                    Some(mine) => mine.merge(p),
                    None => self.permit = Some(p),
                }
                *held.entry(self.client).or_default() += more;
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let bytes = self.bytes();
        if bytes == 0 {
            return;
        }
        let mut held = self.budget.held();
        if let Some(n) = held.get_mut(&self.client) {
            *n = n.saturating_sub(bytes);
            if *n == 0 {
                held.remove(&self.client);
            }
        }
        // The permit returns the global bytes as it drops after this.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientKey = ClientKey::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: ClientKey = ClientKey::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));
    const C: ClientKey = ClientKey::V4(std::net::Ipv4Addr::new(192, 0, 2, 3));

    #[test]
    fn reservations_share_one_budget_and_return_on_drop() {
        let budget = BodyBudget::new(100, 100);
        let mut a = budget.reserve(A, 60).expect("fits");
        assert!(budget.reserve(B, 50).is_none(), "60 + 50 > 100");
        assert!(a.grow_to(90));
        assert!(!a.grow_to(101));
        assert_eq!(a.bytes(), 90);
        assert_eq!(budget.available(), 10);
        drop(a);
        assert_eq!(budget.available(), 100);
        assert!(budget.reserve(A, 0).is_some());
    }

    #[test]
    fn one_client_holds_at_most_its_share() {
        let budget = BodyBudget::new(100, 40);
        let a1 = budget.reserve(A, 30).expect("within the share");
        assert!(budget.reserve(A, 20).is_none(), "30 + 20 > A's share of 40");
        let _b = budget.reserve(B, 40).expect("B has a share of its own");
        let _c = budget.reserve(C, 30).expect("the budget still has 30");
        assert_eq!(budget.available(), 0);
        drop(a1);
        assert!(budget.reserve(A, 30).is_some(), "A's share came back");
        assert!(
            budget.held().get(&A).is_none(),
            "no entry left for an idle client"
        );
    }
}
