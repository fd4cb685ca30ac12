//! The outbound-connection guard: which addresses an agent URL may reach.
//!
//! Every delivery connection is checked against an [`Egress`] policy, and the
//! check is made against the address actually dialled, on every connection:
//!
//! - a name is resolved by [`GuardedResolver`], which refuses the whole lookup
//!   when any address it returned is not allowed, and hands the connector
//!   only addresses it checked. The connector dials those socket addresses
//!   and never gives the name to another resolver, so a name that re-resolves
//!   to a private address between check and dial cannot slip through: each new
//!   connection resolves and checks again.
//! - an IP-literal URL is never resolved; [`GuardedConnector`] checks the
//!   literal before handing the URL to the connector.
//! - whatever path led to the socket, [`GuardedConnector`] checks the
//!   connected peer address once more before the connection carries a byte,
//!   so a URL form the first two checks missed still cannot be used.
//!
//! A delivery client is hyper-util's legacy `Client` built on a
//! [`GuardedConnector`] for the agent's [`Egress`]; set timeouts through
//! [`GuardedConnector::http_mut`].
//!
//! Addresses are classified by [`classify`]; IPv4 embedded in IPv6 (mapped,
//! compatible, NAT64 well-known prefix, 6to4) is classified as the IPv4
//! address it embeds, since that is where the packets end up.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::TokioIo;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::net::TcpStream;
use tower::Service;

/// The boxed error the guard's services return (what hyper-util's client
/// expects of a connector).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What an address is, as far as reaching it from the gateway goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// A globally routable address: always allowed.
    Public,
    /// The gateway's own host (127.0.0.0/8, `::1`).
    Loopback,
    /// On-link only (169.254.0.0/16, `fe80::/10`), metadata addresses aside.
    LinkLocal,
    /// A cloud provider's instance metadata service (169.254.169.254 and its
    /// neighbours, `fd00:ec2::254`, Alibaba's 100.100.100.200).
    CloudMetadata,
    /// Private and shared address space (10/8, 172.16/12, 192.168/16,
    /// 100.64/10 carrier-grade NAT, `fc00::/7`, local-use NAT64).
    Private,
    /// The unspecified address and "this network" (0.0.0.0/8, `::`).
    Unspecified,
    /// Multicast (224.0.0.0/4, `ff00::/8`).
    Multicast,
    /// The IPv4 limited broadcast address 255.255.255.255.
    Broadcast,
    /// Documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24,
    /// `2001:db8::/32`, `3fff::/20`).
    Documentation,
    /// Other special-purpose space that is no agent's address (240/4,
    /// 192.0.0/24, 198.18/15 benchmarking, the 6to4 relay anycast,
    /// `100::/64`, `2001::/23`).
    Reserved,
}

impl Class {
    /// The rule's name as errors and logs give it.
    pub fn rule(self) -> &'static str {
        match self {
            Class::Public => "public",
            Class::Loopback => "loopback",
            Class::LinkLocal => "link-local",
            Class::CloudMetadata => "cloud metadata",
            Class::Private => "private network",
            Class::Unspecified => "unspecified address",
            Class::Multicast => "multicast",
            Class::Broadcast => "broadcast",
            Class::Documentation => "documentation range",
            Class::Reserved => "reserved range",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.rule())
    }
}

/// Which non-public addresses an agent's connections may reach. The default
/// allows public addresses only.
///
/// Unspecified, multicast, broadcast, documentation and reserved addresses
/// are refused whatever the policy: none of them is an agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    /// Private, shared (CGNAT) and link-local addresses are allowed (an
    /// agent on the same network). Config: the agent's
    /// `allow_private_network`.
    pub allow_private_network: bool,
    /// Loopback addresses are allowed (an agent on the gateway's own host).
    /// Config: `allow_loopback`, globally or on the agent.
    pub allow_loopback: bool,
    /// Cloud metadata addresses are allowed. Kept apart from
    /// [`allow_private_network`](Self::allow_private_network) on purpose:
    /// the metadata service hands the instance's cloud credentials to
    /// anything on the host that asks, and no agent lives there. An agent
    /// URL that points at it (directly, or through a name an attacker
    /// controls) would turn delivery into a way to read those credentials,
    /// so allowing the private network, which agents in the same VPC need,
    /// must not open it too. Config: the agent's `allow_cloud_metadata`.
    pub allow_cloud_metadata: bool,
}

impl Egress {
    /// Whether this policy allows connecting to an address of `class`.
    pub fn permits(&self, class: Class) -> bool {
        match class {
            Class::Public => true,
            Class::Loopback => self.allow_loopback,
            Class::LinkLocal | Class::Private => self.allow_private_network,
            Class::CloudMetadata => self.allow_cloud_metadata,
            Class::Unspecified
            | Class::Multicast
            | Class::Broadcast
            | Class::Documentation
            | Class::Reserved => false,
        }
    }

    /// Checks one address: `Ok` when allowed, else the class that refused it.
    pub fn check(&self, ip: IpAddr) -> Result<(), Class> {
        let class = classify(ip);
        if self.permits(class) {
            Ok(())
        } else {
            Err(class)
        }
    }
}

/// Why a connection was not made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// The host (a name or an IP literal) resolved to an address the policy
    /// does not allow.
    #[error("agent URL host {host} resolved to {addr} ({class}); refused")]
    Refused {
        /// The URL's host as written.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// The rule that refused it.
        class: Class,
    },
    /// The connection reached an address the policy does not allow by a path
    /// the checks before dialling missed; it is closed before carrying a
    /// byte. A backstop: no URL form is known to get here.
    #[error("agent URL host {host} connected to {addr} ({class}); closed unused, refused")]
    RefusedPeer {
        /// The URL's host as written.
        host: String,
        /// The connected peer's address.
        addr: IpAddr,
        /// The rule that refused it.
        class: Class,
    },
    /// The name resolved to no address at all.
    #[error("agent URL host {host} resolved to no address")]
    NoAddress {
        /// The URL's host as written.
        host: String,
    },
    /// The URL has no host to connect to. (The URL itself is left out: its
    /// path or query may carry a token.)
    #[error("agent URL has no host")]
    NoHost,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(s: [u16; 8], len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        len,
    )
}

/// Instance metadata services: AWS/GCP/Azure/Oracle/DigitalOcean
/// (169.254.169.254), AWS ECS task metadata (169.254.170.2), EKS pod identity
/// (169.254.170.23), Alibaba (100.100.100.200).
const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(169, 254, 170, 23),
    Ipv4Addr::new(100, 100, 100, 200),
];

/// AWS's IPv6 metadata endpoints (instance metadata, EKS pod identity).
const METADATA_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254),
    Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x23),
];

/// IPv4 ranges in the order they are tried (broadcast, the one address in
/// 240/4 with its own rule, comes before that range).
const RANGES_V4: [(Ipv4Net, Class); 16] = [
    (v4(0, 0, 0, 0, 8), Class::Unspecified),
    (v4(127, 0, 0, 0, 8), Class::Loopback),
    (v4(169, 254, 0, 0, 16), Class::LinkLocal),
    (v4(10, 0, 0, 0, 8), Class::Private),
    (v4(172, 16, 0, 0, 12), Class::Private),
    (v4(192, 168, 0, 0, 16), Class::Private),
    (v4(100, 64, 0, 0, 10), Class::Private),
    (v4(224, 0, 0, 0, 4), Class::Multicast),
    (v4(255, 255, 255, 255, 32), Class::Broadcast),
    (v4(192, 0, 2, 0, 24), Class::Documentation),
    (v4(198, 51, 100, 0, 24), Class::Documentation),
    (v4(203, 0, 113, 0, 24), Class::Documentation),
    (v4(240, 0, 0, 0, 4), Class::Reserved),
    (v4(192, 0, 0, 0, 24), Class::Reserved),
    (v4(198, 18, 0, 0, 15), Class::Reserved),
    (v4(192, 88, 99, 0, 24), Class::Reserved),
];

/// IPv6 ranges, tried after the embedded-IPv4 forms and metadata addresses.
const RANGES_V6: [(Ipv6Net, Class); 11] = [
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), Class::Unspecified),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), Class::Loopback),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), Class::LinkLocal),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), Class::Private),
    // Deprecated site-local: private in all but name.
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), Class::Private),
    // Local-use NAT64 (RFC 8215): translates to an operator's own network.
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), Class::Private),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), Class::Multicast),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        Class::Documentation,
    ),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), Class::Documentation),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), Class::Reserved),
    // IETF protocol assignments, Teredo (which hides an IPv4 address) among them.
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), Class::Reserved),
];

/// The IPv4-mapped prefix `::ffff:0:0/96`.
const MAPPED: Ipv6Net = v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96);
/// The IPv4-compatible prefix `::/96` (deprecated, still routed by some stacks).
const COMPATIBLE: Ipv6Net = v6([0, 0, 0, 0, 0, 0, 0, 0], 96);
/// The NAT64 well-known prefix `64:ff9b::/96`.
const NAT64: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
/// 6to4 `2002::/16`: the IPv4 address sits in bits 16..48.
const SIX_TO_FOUR: Ipv6Net = v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);

/// The IPv4 address an IPv6 address carries to, if it is one of the forms
/// that embed one (mapped, compatible, NAT64 well-known prefix, 6to4).
/// `::` and `::1` are not taken as compatible addresses: they are IPv6's own.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if MAPPED.contains(&ip) || NAT64.contains(&ip) {
        return Some(low);
    }
    if COMPATIBLE.contains(&ip) && ip != Ipv6Addr::UNSPECIFIED && ip != Ipv6Addr::LOCALHOST {
        return Some(low);
    }
    if SIX_TO_FOUR.contains(&ip) {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// Classifies an address (embedded IPv4 as the IPv4 it embeds).
pub fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(ip) => classify_v4(ip),
        IpAddr::V6(ip) => match embedded_v4(ip) {
            Some(inner) => classify_v4(inner),
            None => classify_v6(ip),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    if METADATA_V4.contains(&ip) {
        return Class::CloudMetadata;
    }
    RANGES_V4
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map_or(Class::Public, |&(_, class)| class)
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    if METADATA_V6.contains(&ip) {
        return Class::CloudMetadata;
    }
    RANGES_V6
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map_or(Class::Public, |&(_, class)| class)
}

/// Checks every address a host resolved to. One refused address refuses the
/// whole answer rather than being skipped: an answer mixing public and
/// private addresses is the shape of a rebinding attempt, and refusing it
/// keeps delivery's outcome independent of the order addresses come back in.
pub fn check_all(host: &str, addrs: &[SocketAddr], policy: Egress) -> Result<(), GuardError> {
    if addrs.is_empty() {
        return Err(GuardError::NoAddress {
            host: host.to_owned(),
        });
    }
    for addr in addrs {
        policy
            .check(addr.ip())
            .map_err(|class| GuardError::Refused {
                host: host.to_owned(),
                addr: addr.ip(),
                class,
            })?;
    }
    Ok(())
}

/// A resolver (a `tower::Service<Name>`, as hyper-util's [`HttpConnector`]
/// takes) that resolves through `R` and passes on only answers whose every
/// address the policy allows.
#[derive(Clone, Debug)]
pub struct GuardedResolver<R = GaiResolver> {
    inner: R,
    policy: Egress,
}

impl<R> GuardedResolver<R> {
    /// Guards `inner`'s answers with `policy`.
    pub fn new(inner: R, policy: Egress) -> Self {
        GuardedResolver { inner, policy }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<R> Service<Name> for GuardedResolver<R>
where
    R: Service<Name>,
    R::Response: Iterator<Item = SocketAddr>,
    R::Error: Into<BoxError>,
    R::Future: Send + 'static,
{
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        let policy = self.policy;
        let resolving = self.inner.call(name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = resolving.await.map_err(Into::into)?.collect();
            check_all(&host, &addrs, policy)?;
            Ok(addrs.into_iter())
        })
    }
}

/// A connector for hyper-util's client (a `tower::Service<Uri>`) that connects
/// only to addresses the policy allows: names through a [`GuardedResolver`],
/// IP literals checked before dialling, and the connected peer checked again.
/// One connector serves one policy (an agent's).
#[derive(Clone, Debug)]
pub struct GuardedConnector<R = GaiResolver> {
    http: HttpConnector<GuardedResolver<R>>,
    policy: Egress,
}

impl GuardedConnector {
    /// A connector resolving with the system resolver (`getaddrinfo`).
    pub fn new(policy: Egress) -> Self {
        Self::with_resolver(policy, GaiResolver::new())
    }
}

impl<R> GuardedConnector<R> {
    /// A connector resolving names with `resolver`; its answers are checked
    /// like the system resolver's.
    pub fn with_resolver(policy: Egress, resolver: R) -> Self {
        GuardedConnector {
            http: HttpConnector::new_with_resolver(GuardedResolver::new(resolver, policy)),
            policy,
        }
    }

    /// The underlying connector, for its socket options (connect timeout,
    /// nodelay, `enforce_http`); its resolver stays the guarded one.
    pub fn http_mut(&mut self) -> &mut HttpConnector<GuardedResolver<R>> {
        &mut self.http
    }

    /// The policy this connector enforces.
    pub fn policy(&self) -> Egress {
        self.policy
    }
}

/// The guard's own error in `e`'s source chain, if it is there (hyper-util
/// wraps resolver errors in its own).
fn guard_error(e: &(dyn StdError + 'static)) -> Option<GuardError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(g) = err.downcast_ref::<GuardError>() {
            return Some(g.clone());
        }
        cur = err.source();
    }
    None
}

impl<R> Service<Uri> for GuardedConnector<R>
where
    R: Service<Name> + Clone + Send + Sync + 'static,
    R::Response: Iterator<Item = SocketAddr>,
    R::Error: Into<BoxError>,
    R::Future: Send + 'static,
{
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let policy = self.policy;
        let Some(host) = uri.host().map(str::to_owned) else {
            return Box::pin(std::future::ready(Err(GuardError::NoHost.into())));
        };
        // hyper-util dials an IP literal without resolving it (it parses the
        // host, brackets stripped, the same way): check it here.
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host);
        if let Ok(ip) = bare.parse::<IpAddr>()
            && let Err(class) = policy.check(ip)
        {
            let e = GuardError::Refused {
                host,
                addr: ip,
                class,
            };
            return Box::pin(std::future::ready(Err(e.into())));
        }
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let io = connecting.await.map_err(|e| -> BoxError {
                match guard_error(&e) {
                    Some(g) => g.into(),
                    None => e.into(),
                }
            })?;
            // The address actually connected to, whatever led there.
            let peer = io.inner().peer_addr()?;
            if let Err(class) = policy.check(peer.ip()) {
                return Err(GuardError::RefusedPeer {
                    host,
                    addr: peer.ip(),
                    class,
                }
                .into());
            }
            Ok(io)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classification_table() {
        use Class::*;
        let table: &[(&str, Class)] = &[
            // Public.
            ("1.1.1.1", Public),
            ("8.8.8.8", Public),
            ("93.184.216.34", Public),
            ("100.63.255.255", Public),
            ("100.128.0.0", Public),
            ("172.15.255.255", Public),
            ("172.32.0.0", Public),
            ("169.253.255.255", Public),
            ("223.255.255.255", Public),
            ("2606:4700:4700::1111", Public),
            ("2a00:1450:4001::200e", Public),
            // Loopback.
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("::1", Loopback),
            // Link-local.
            ("169.254.0.1", LinkLocal),
            ("169.254.169.253", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf:ffff::1", LinkLocal),
            // Cloud metadata, in every spelling.
            ("169.254.169.254", CloudMetadata),
            ("169.254.170.2", CloudMetadata),
            ("169.254.170.23", CloudMetadata),
            ("100.100.100.200", CloudMetadata),
            ("fd00:ec2::254", CloudMetadata),
            ("fd00:ec2::23", CloudMetadata),
            ("::ffff:169.254.169.254", CloudMetadata),
            ("::ffff:a9fe:a9fe", CloudMetadata),
            ("::169.254.169.254", CloudMetadata),
            ("64:ff9b::169.254.169.254", CloudMetadata),
            ("64:ff9b::a9fe:a9fe", CloudMetadata),
            ("2002:a9fe:a9fe::1", CloudMetadata),
            ("::ffff:100.100.100.200", CloudMetadata),
            // Private.
            ("10.0.0.1", Private),
            ("10.255.255.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("100.127.255.255", Private),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fd00:ec2::1", Private),
            ("fec0::1", Private),
            ("64:ff9b:1::a00:1", Private),
            // Embedded private IPv4 is the IPv4 it embeds.
            ("::ffff:10.0.0.1", Private),
            ("::ffff:192.168.0.1", Private),
            ("::10.0.0.1", Private),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::c0a8:101", Private),
            ("2002:0a00:0001::", Private),
            ("::ffff:127.0.0.1", Loopback),
            ("64:ff9b::127.0.0.1", Loopback),
            ("::127.0.0.1", Loopback),
            ("::ffff:169.254.1.1", LinkLocal),
            ("::ffff:8.8.8.8", Public),
            ("64:ff9b::8.8.8.8", Public),
            ("2002:0808:0808::1", Public),
            // Unspecified.
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("::", Unspecified),
            ("::ffff:0.0.0.0", Unspecified),
            // Multicast and broadcast.
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("ff05::1:3", Multicast),
            ("255.255.255.255", Broadcast),
            ("::ffff:255.255.255.255", Broadcast),
            // Documentation.
            ("192.0.2.1", Documentation),
            ("198.51.100.7", Documentation),
            ("203.0.113.9", Documentation),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            // Reserved.
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("192.0.0.8", Reserved),
            ("198.18.0.1", Reserved),
            ("198.19.255.255", Reserved),
            ("192.88.99.1", Reserved),
            ("100::1", Reserved),
            ("2001::1", Reserved),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Reserved),
        ];
        let wrong: Vec<String> = table
            .iter()
            .filter(|&&(a, want)| classify(ip(a)) != want)
            .map(|&(a, want)| format!("{a}: want {want}, got {}", classify(ip(a))))
            .collect();
        assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
    }

    #[test]
    fn policy_switches_are_independent() {
        let strict = Egress::default();
        let private = Egress {
            allow_private_network: true,
            ..Egress::default()
        };
        let loopback = Egress {
            allow_loopback: true,
            ..Egress::default()
        };
        let metadata = Egress {
            allow_cloud_metadata: true,
            ..Egress::default()
        };
        let all = Egress {
            allow_private_network: true,
            allow_loopback: true,
            allow_cloud_metadata: true,
        };
        let cases = [
            ("8.8.8.8", [true, true, true, true, true]),
            ("10.0.0.1", [false, true, false, false, true]),
            ("::ffff:10.0.0.1", [false, true, false, false, true]),
            ("169.254.1.1", [false, true, false, false, true]),
            ("127.0.0.1", [false, false, true, false, true]),
            ("::1", [false, false, true, false, true]),
            // Allowing the private network does not open the metadata service.
            ("169.254.169.254", [false, false, false, true, true]),
            ("100.100.100.200", [false, false, false, true, true]),
            ("fd00:ec2::254", [false, false, false, true, true]),
            // No switch opens these.
            ("0.0.0.0", [false; 5]),
            ("255.255.255.255", [false; 5]),
            ("224.0.0.1", [false; 5]),
            ("192.0.2.1", [false; 5]),
            ("240.0.0.1", [false; 5]),
        ];
        let policies = [strict, private, loopback, metadata, all];
        for (addr, want) in cases {
            for (policy, want) in policies.iter().zip(want) {
                assert_eq!(
                    policy.check(ip(addr)).is_ok(),
                    want,
                    "{addr} under {policy:?}"
                );
            }
        }
    }

    #[test]
    fn one_refused_address_refuses_the_answer() {
        let addrs: Vec<SocketAddr> = vec![
            "8.8.8.8:80".parse().unwrap(),
            "[::ffff:10.1.2.3]:80".parse().unwrap(),
        ];
        let e = check_all("mixed.example", &addrs, Egress::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent URL host mixed.example resolved to ::ffff:10.1.2.3 (private network); refused"
        );
        assert!(matches!(
            check_all("none.example", &[], Egress::default()),
            Err(GuardError::NoAddress { .. })
        ));
        assert!(check_all("public.example", &addrs[..1], Egress::default()).is_ok());
    }
}
