//! The outbound-connection guard over real HTTP: a hyper-util client on the
//! guarded connector against an axum server on 127.0.0.1. Loopback is refused
//! unless allowed (as an IP literal and through `localhost`), private and
//! metadata literals are refused before any dial, numeric spellings such as
//! `127.1` are caught at resolution, and a name that resolves to a private
//! address on a later connection is refused on that connection.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use sluice::dispatch::guard::{Class, Egress, GuardError, GuardedConnector};

/// Bounds every request: a refused connection fails at once, an allowed one
/// to 127.0.0.1 answers at once; nothing here may hang.
const WITHIN: Duration = Duration::from_secs(10);

/// An axum server on 127.0.0.1:0 answering "ok"; counts the requests it got.
async fn agent() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

type Guarded<R> = Client<GuardedConnector<R>, Empty<Bytes>>;

fn client<R>(mut connector: GuardedConnector<R>) -> Guarded<R>
where
    R: tower::Service<Name> + Clone + Send + Sync + 'static,
    R::Response: Iterator<Item = SocketAddr>,
    R::Error: Into<sluice::dispatch::guard::BoxError>,
    R::Future: Send + 'static,
{
    connector
        .http_mut()
        .set_connect_timeout(Some(Duration::from_secs(2)));
    // No pooling: every request is a new connection, so every request runs
    // the check.
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// GET `url`; the body on a 200, else the guard's error (the test fails on
/// any other outcome).
async fn get<F>(request: F) -> Result<String, GuardError>
where
    F: Future<
        Output = Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    >,
{
    let outcome = tokio::time::timeout(WITHIN, request)
        .await
        .expect("request finished in time");
    match outcome {
        Ok(resp) => {
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            Ok(String::from_utf8(body.to_vec()).unwrap())
        }
        Err(e) => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = cur {
                if let Some(g) = err.downcast_ref::<GuardError>() {
                    return Err(g.clone());
                }
                cur = err.source();
            }
            panic!("request failed, not by the guard: {e:?}");
        }
    }
}

fn uri(s: String) -> http::Uri {
    s.parse().unwrap()
}

fn loopback_ok() -> Egress {
    Egress {
        allow_loopback: true,
        ..Egress::default()
    }
}

fn refused_class(e: &GuardError) -> (String, IpAddr, Class) {
    match e {
        GuardError::Refused { host, addr, class } => (host.clone(), *addr, *class),
        other => panic!("not a refusal: {other}"),
    }
}

#[tokio::test]
async fn loopback_literal_refused_unless_allowed() {
    let (addr, hits) = agent().await;
    let url = format!("http://{addr}/");

    let strict = client(GuardedConnector::new(Egress::default()));
    let e = get(strict.get(uri(url.clone()))).await.unwrap_err();
    assert_eq!(
        refused_class(&e),
        (
            "127.0.0.1".into(),
            "127.0.0.1".parse().unwrap(),
            Class::Loopback
        )
    );
    assert_eq!(
        e.to_string(),
        "agent URL host 127.0.0.1 resolved to 127.0.0.1 (loopback); refused"
    );
    // Allowing the private network does not allow loopback.
    let private = client(GuardedConnector::new(Egress {
        allow_private_network: true,
        ..Egress::default()
    }));
    assert!(get(private.get(uri(url.clone()))).await.is_err());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a refused request got through"
    );

    let allowed = client(GuardedConnector::new(loopback_ok()));
    assert_eq!(get(allowed.get(uri(url))).await.unwrap(), "ok");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn localhost_name_refused_unless_allowed() {
    let (addr, hits) = agent().await;
    let url = format!("http://localhost:{}/", addr.port());

    let strict = client(GuardedConnector::new(Egress::default()));
    let e = get(strict.get(uri(url.clone()))).await.unwrap_err();
    let (host, ip, class) = refused_class(&e);
    assert_eq!(host, "localhost");
    assert!(ip.is_loopback(), "{ip}");
    assert_eq!(class, Class::Loopback);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a refused request got through"
    );

    let allowed = client(GuardedConnector::new(loopback_ok()));
    assert_eq!(get(allowed.get(uri(url))).await.unwrap(), "ok");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn private_and_metadata_literals_refused_before_dialling() {
    // None of these is dialled: the refusal comes before any connect, so
    // the unroutable addresses cannot stall the test (WITHIN bounds it anyway).
    let cases = [
        (
            "http://10.255.255.1/",
            Egress::default(),
            "10.255.255.1",
            Class::Private,
        ),
        (
            "http://[::ffff:10.255.255.1]/",
            loopback_ok(),
            "::ffff:10.255.255.1",
            Class::Private,
        ),
        (
            "http://[64:ff9b::a00:1]:8080/",
            loopback_ok(),
            "64:ff9b::a00:1",
            Class::Private,
        ),
        (
            "http://100.64.0.1/",
            Egress::default(),
            "100.64.0.1",
            Class::Private,
        ),
        (
            "http://169.254.1.1/",
            Egress::default(),
            "169.254.1.1",
            Class::LinkLocal,
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            Egress {
                allow_private_network: true,
                allow_loopback: true,
                allow_cloud_metadata: false,
            },
            "169.254.169.254",
            Class::CloudMetadata,
        ),
        (
            "http://[fd00:ec2::254]/",
            Egress {
                allow_private_network: true,
                ..Egress::default()
            },
            "fd00:ec2::254",
            Class::CloudMetadata,
        ),
        (
            "http://0.0.0.0/",
            loopback_ok(),
            "0.0.0.0",
            Class::Unspecified,
        ),
    ];
    for (url, policy, addr, class) in cases {
        let c = client(GuardedConnector::new(policy));
        let e = get(c.get(uri(url.into()))).await.unwrap_err();
        let (_, got_addr, got_class) = refused_class(&e);
        assert_eq!(
            (got_addr, got_class),
            (addr.parse().unwrap(), class),
            "{url}"
        );
    }
    let c = client(GuardedConnector::new(Egress::default()));
    let e = get(c.get(uri("http://10.255.255.1/".into())))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "agent URL host 10.255.255.1 resolved to 10.255.255.1 (private network); refused"
    );
}

/// A resolver that answers from a script, one answer per lookup: a name
/// whose answer changes between connections, as under DNS rebinding.
#[derive(Clone, Default)]
struct Scripted(Arc<Mutex<VecDeque<Vec<SocketAddr>>>>);

impl tower::Service<Name> for Scripted {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        let next = self
            .0
            .lock()
            .unwrap()
            .pop_front()
            .expect("a scripted answer");
        std::future::ready(Ok(next.into_iter()))
    }
}

#[tokio::test]
async fn a_name_rebinding_to_a_private_address_is_refused_on_that_connection() {
    let (addr, hits) = agent().await;
    let private: SocketAddr = "10.255.255.1:80".parse().unwrap();
    let script = Scripted::default();
    script.0.lock().unwrap().extend([
        vec![addr],
        vec![private],
        // One refused address refuses the answer, even beside an allowed one.
        vec![addr, private],
        vec![addr],
    ]);
    let c = client(GuardedConnector::with_resolver(
        loopback_ok(),
        script.clone(),
    ));
    let url = format!("http://agent.test:{}/", addr.port());

    assert_eq!(get(c.get(uri(url.clone()))).await.unwrap(), "ok");
    for _ in 0..2 {
        let e = get(c.get(uri(url.clone()))).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "agent URL host agent.test resolved to 10.255.255.1 (private network); refused"
        );
    }
    assert_eq!(get(c.get(uri(url))).await.unwrap(), "ok");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(
        script.0.lock().unwrap().is_empty(),
        "every request resolved again"
    );
}

#[tokio::test]
async fn numeric_spellings_of_loopback_are_resolved_and_refused() {
    // Not IP literals to hyper-util (Rust's parser takes dotted quads only),
    // so they go to the system resolver, which reads them as 127.0.0.1: the
    // resolver's answer is what is checked.
    let (addr, hits) = agent().await;
    let port = addr.port();
    let strict = client(GuardedConnector::new(Egress::default()));
    for host in ["127.1", "2130706433", "0x7f000001", "0177.0.0.1"] {
        let url = format!("http://{host}:{port}/");
        let e = get(strict.get(uri(url.clone()))).await.unwrap_err();
        let (got_host, ip, class) = refused_class(&e);
        assert_eq!(got_host, host, "{url}");
        assert_eq!(ip, "127.0.0.1".parse::<IpAddr>().unwrap(), "{url}");
        assert_eq!(class, Class::Loopback, "{url}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a refused request got through"
    );
}
