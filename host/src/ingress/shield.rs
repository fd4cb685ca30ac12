//! The per-IP shield: a keyed rate limit checked before any crypto, and the
//! client address as seen through trusted proxies.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use ipnet::IpNet;

use crate::config::ShieldConfig;

/// The per-IP limiter.
#[derive(Debug)]
pub struct Shield {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Shield {
    /// A shield from config; a disabled one lets everything through.
    pub fn new(config: &ShieldConfig) -> Self {
        let limiter = config.enabled.then(|| {
            let per_second = NonZeroU32::new(config.per_second).expect("validated non-zero");
            let burst = NonZeroU32::new(config.burst).expect("validated non-zero");
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        Shield { limiter }
    }

    /// `Err(wait)` when `ip` is over its rate.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        match &self.limiter {
            None => Ok(()),
            Some(l) => l
                .check_key(&ip)
                .map_err(|nu| nu.wait_time_from(DefaultClock::default().now())),
        }
    }

    /// Forgets idle clients so memory stays bounded; call periodically.
    pub fn sweep(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if trusted.is_empty() || !trusted.iter().any(|n| n.contains(&peer_ip)) {
        return peer_ip;
    }
    let mut client = peer_ip;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else { break };
        for hop in value.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else {
                return client;
            };
            client = ip.to_canonical();
            if !trusted.iter().any(|n| n.contains(&client)) {
                return client;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` hop: an address, or an address with a port
/// (`203.0.113.9:4711`, `[2001:db8::1]:4711`), as some proxies write it.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}
