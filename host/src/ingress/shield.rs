//! The per-client shield: a keyed rate limit checked before any crypto, and the
//! client as seen through trusted proxies.
//!
//! A client is keyed by its IPv4 address or its IPv6 /64 (one subscriber gets a
//! whole /64, so keying per /128 would give each one 2^64 buckets). A request
//! whose `X-Forwarded-For` cannot be read is never taken for the proxy itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use ipnet::IpNet;

use crate::config::ShieldConfig;

/// Who sent a request, as far as the gateway can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// The peer, or the right-most `X-Forwarded-For` hop that is not a trusted proxy.
    Ip(IpAddr),
    /// Sent through the trusted proxy `proxy`, whose `X-Forwarded-For` could not
    /// be read (not ASCII, not an address): someone on the proxy's untrusted
    /// side. It has its own shield bucket and matches no allow-list.
    Unidentified {
        /// The trusted hop that forwarded it.
        proxy: IpAddr,
    },
}

impl Client {
    /// The shield's (and the connection cap's) key for this client.
    pub fn key(self) -> ClientKey {
        match self {
            Client::Ip(ip) => ClientKey::of(ip),
            Client::Unidentified { proxy } => ClientKey::Unidentified(proxy.to_canonical()),
        }
    }

    /// True when the client's address is inside one of `nets`; an
    /// unidentified client is inside none.
    pub fn is_in(self, nets: &[IpNet]) -> bool {
        match self {
            Client::Ip(ip) => nets.iter().any(|n| n.contains(&ip)),
            Client::Unidentified { .. } => false,
        }
    }
}

/// What per-client limits are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// One IPv4 address (IPv4-mapped IPv6 addresses included).
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address: its /64.
    V6Net(u64),
    /// Unreadable `X-Forwarded-For` through this proxy.
    Unidentified(IpAddr),
}

impl ClientKey {
    /// The key of a client address: IPv4 per address, IPv6 per /64.
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => ClientKey::V6Net((v6.to_bits() >> 64) as u64),
        }
    }
}

/// The per-client limiter.
#[derive(Debug)]
pub struct Shield {
    limiter: Option<DefaultKeyedRateLimiter<ClientKey>>,
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

    /// `Err(wait)` when `client` is over its rate.
    pub fn check(&self, client: Client) -> Result<(), Duration> {
        match &self.limiter {
            None => Ok(()),
            Some(l) => l
                .check_key(&client.key())
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

/// The client: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy. When a hop that
/// must be read is not an address, the client is [`Client::Unidentified`]
/// behind the last trusted hop: it fails closed, never as the proxy itself.
pub fn client(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Client {
    let peer_ip = peer.ip().to_canonical();
    if trusted.is_empty() || !trusted.iter().any(|n| n.contains(&peer_ip)) {
        return Client::Ip(peer_ip);
    }
    let mut last_trusted = peer_ip;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else {
            return Client::Unidentified {
                proxy: last_trusted,
            };
        };
        for hop in value.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else {
                return Client::Unidentified {
                    proxy: last_trusted,
                };
            };
            let ip = ip.to_canonical();
            if !trusted.iter().any(|n| n.contains(&ip)) {
                return Client::Ip(ip);
            }
            last_trusted = ip;
        }
    }
    // Every hop was a trusted proxy: the request started at one of them.
    Client::Ip(last_trusted)
}

/// One `X-Forwarded-For` hop: an address, or an address with a port
/// (`203.0.113.9:4711`, `[2001:db8::1]:4711`), as some proxies write it.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_slash_64() {
        let a = ClientKey::of(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(a, ClientKey::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert_ne!(a, ClientKey::of(ip("2001:db8:1:3::1")));
        assert_eq!(
            ClientKey::of(ip("192.0.2.1")),
            ClientKey::V4("192.0.2.1".parse().unwrap())
        );
        assert_ne!(
            ClientKey::of(ip("192.0.2.1")),
            ClientKey::of(ip("192.0.2.2"))
        );
        // An IPv4-mapped address is that IPv4 client, not an IPv6 /64.
        assert_eq!(
            ClientKey::of(ip("::ffff:192.0.2.1")),
            ClientKey::of(ip("192.0.2.1"))
        );
    }

    #[test]
    fn one_slash_64_shares_one_shield_bucket() {
        let shield = Shield::new(&ShieldConfig {
            enabled: true,
            per_second: 1,
            burst: 3,
        });
        for i in 1..=3 {
            let addr = ip(&format!("2001:db8:0:7::{i}"));
            assert_eq!(shield.check(Client::Ip(addr)), Ok(()), "{addr}");
        }
        // Another address in the same /64 finds the bucket empty…
        assert!(shield.check(Client::Ip(ip("2001:db8:0:7::beef"))).is_err());
        // …while the next /64 has its own.
        assert_eq!(shield.check(Client::Ip(ip("2001:db8:0:8::1"))), Ok(()));
    }

    fn forwarded(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                "x-forwarded-for",
                http::HeaderValue::from_bytes(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn unreadable_forwarded_for_fails_closed() {
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let proxy = Client::Unidentified {
            proxy: ip("127.0.0.1"),
        };
        for bad in [
            &b"192.0.2.1\xc3\xa9"[..],
            b"\xff",
            b"not-an-address",
            b"192.0.2.1, ",
            b"",
        ] {
            let got = client(peer, &forwarded(&[bad]), &trusted);
            assert_eq!(got, proxy, "{}", String::from_utf8_lossy(bad));
            assert!(
                !got.is_in(&trusted),
                "an unidentified client matches no allow-list"
            );
            assert_ne!(got.key(), Client::Ip(ip("127.0.0.1")).key());
        }
        // A hop that is itself trusted, then an unreadable one: behind that hop.
        assert_eq!(
            client(peer, &forwarded(&[b"junk, 127.0.0.2"]), &trusted),
            Client::Unidentified {
                proxy: ip("127.0.0.2")
            }
        );
        // Readable headers are unchanged.
        assert_eq!(
            client(
                peer,
                &forwarded(&[b"198.51.100.1, 192.0.2.10:4711"]),
                &trusted
            ),
            Client::Ip(ip("192.0.2.10"))
        );
        assert_eq!(
            client(peer, &HeaderMap::new(), &trusted),
            Client::Ip(ip("127.0.0.1"))
        );
        // An untrusted peer's header is not read at all.
        let outside: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        assert_eq!(
            client(outside, &forwarded(&[b"\xff"]), &trusted),
            Client::Ip(ip("198.51.100.7"))
        );
    }

    #[test]
    fn an_unidentified_client_has_its_own_bucket() {
        let shield = Shield::new(&ShieldConfig {
            enabled: true,
            per_second: 1,
            burst: 2,
        });
        let proxy = ip("127.0.0.1");
        let unidentified = Client::Unidentified { proxy };
        assert_eq!(shield.check(unidentified), Ok(()));
        assert_eq!(shield.check(unidentified), Ok(()));
        assert!(shield.check(unidentified).is_err());
        assert_eq!(
            shield.check(Client::Ip(proxy)),
            Ok(()),
            "the proxy's own bucket is untouched"
        );
    }
}
