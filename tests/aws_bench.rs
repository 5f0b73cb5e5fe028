//! Activation time and API call counts against moto (ignored by default: it measures).
//!
//! Run: `cargo test --release --test aws_bench -- --ignored --nocapture`
//! Three route tables + EIP + Route 53 record (INSYNC) per activation, alternating between the
//! two nodes so every activation really switches everything; 20 runs each, without and with
//! 100 ms latency added to every API call by the fault proxy.

mod support;

use std::time::Duration;

use support::fault_proxy::FaultProxy;
use support::moto::Moto;
use support::world::World;
use twinvol::cloud::aws::AwsCloud;
use twinvol::cloud::{Cloud, Outcome, Resource};

struct Figures {
    median: Duration,
    p90: Duration,
    max: Duration,
    route_median: Duration,
    calls: f64,
    calls_by_action: Vec<(String, f64)>,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn run(a: &AwsCloud, b: &AwsCloud, proxy: &FaultProxy, n: usize) -> Figures {
    let mut times = Vec::new();
    let mut route_times = Vec::new();
    proxy.reset_stats();
    for i in 0..n {
        let node = if i % 2 == 0 { b } else { a };
        let r = node.activate().await;
        assert!(r.succeeded(), "{r}");
        assert!(
            r.items
                .iter()
                .all(|x| matches!(x.outcome, Outcome::Applied(_))),
            "every activation switches everything:\n{r}"
        );
        times.push(r.elapsed);
        route_times.push(
            r.items
                .iter()
                .filter(|x| matches!(x.resource, Resource::RouteTable(_)))
                .map(|x| x.elapsed)
                .max()
                .unwrap(),
        );
    }
    let s = proxy.stats();
    let mut by: Vec<(String, f64)> = s
        .by_action
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64 / n as f64))
        .collect();
    by.sort_by(|x, y| x.0.cmp(&y.0));
    Figures {
        median: pct(&mut times.clone(), 0.5),
        p90: pct(&mut times.clone(), 0.9),
        max: pct(&mut times, 1.0),
        route_median: pct(&mut route_times, 0.5),
        calls: s.total() as f64 / n as f64,
        calls_by_action: by,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn activation_time_and_api_calls_against_moto() {
    let moto = Moto::start();
    let w = World::build(&moto.url()).await;
    let proxy = FaultProxy::start(moto.addr).await;
    let a = AwsCloud::connect(&w.config(&w.a, &w.b, &proxy.url, |_| {}))
        .await
        .unwrap();
    let b = AwsCloud::connect(&w.config(&w.b, &w.a, &proxy.url, |_| {}))
        .await
        .unwrap();
    // Warm-up: connections, moto's lazy state.
    for _ in 0..2 {
        assert!(b.activate().await.succeeded());
        assert!(a.activate().await.succeeded());
    }
    let n = 20;
    let plain = run(&a, &b, &proxy, n).await;
    proxy.set(|f| f.latency = Duration::from_millis(100));
    let slow = run(&a, &b, &proxy, n).await;
    proxy.set(|f| f.latency = Duration::ZERO);

    // One Route 53 change that is PENDING for one poll (interval 50 ms), as on real Route 53.
    proxy.set(|f| f.pending_polls = 1);
    let mut pending = Vec::new();
    for i in 0..n {
        proxy.set(|f| f.pending_polls = 1);
        let r = if i % 2 == 0 {
            b.activate().await
        } else {
            a.activate().await
        };
        assert!(r.succeeded(), "{r}");
        pending.push(r.elapsed);
    }
    let pending_median = pct(&mut pending, 0.5);

    // Monitor cycle: everything in place, then count calls of one check.
    proxy.reset_stats();
    let c = a.check().await;
    assert!(c.all_ok(), "{c}");
    let check_calls = proxy.stats();

    // Idempotent re-activation (nothing to change).
    proxy.reset_stats();
    let again = a.activate().await;
    assert!(
        again.items.iter().all(|i| i.outcome == Outcome::Unchanged),
        "{again}"
    );
    let noop_calls = proxy.stats().total();

    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    println!("| case | median ms | p90 ms | max ms | route tables (median) ms | API calls / activation |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| no added latency | {} | {} | {} | {} | {:.1} |",
        ms(plain.median),
        ms(plain.p90),
        ms(plain.max),
        ms(plain.route_median),
        plain.calls
    );
    println!(
        "| +100 ms per API call | {} | {} | {} | {} | {:.1} |",
        ms(slow.median),
        ms(slow.p90),
        ms(slow.max),
        ms(slow.route_median),
        slow.calls
    );
    println!(
        "| Route 53 PENDING for one 50 ms poll | {} | | | | |",
        ms(pending_median)
    );
    println!();
    println!(
        "calls per activation by action: {:?}",
        plain.calls_by_action
    );
    let mut cc: Vec<_> = check_calls.by_action.iter().collect();
    cc.sort();
    println!("calls per monitor cycle: {} {:?}", check_calls.total(), cc);
    println!("calls per activation with nothing to change: {noop_calls}");
}
