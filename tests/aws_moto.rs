//! The AWS network identity against moto in server mode, with a fault-injecting proxy between
//! the SDK and moto. Needs `scripts/test-deps.sh` (moto[server] in a virtualenv). Never talks to
//! a real AWS endpoint or to 169.254.169.254: every endpoint is a loopback override.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::fake_imds::FakeImds;
use support::fault_proxy::FaultProxy;
use support::moto::Moto;
use support::world::{World, RECORD, VIP};
use twinvol::cloud::aws::AwsCloud;
use twinvol::cloud::{
    az, Cloud, DryRun, Health, Outcome, PeerInstance, Propagation, Resource, UnreachableAction,
};

struct Lab {
    w: World,
    proxy: FaultProxy,
    _moto: Moto,
}

async fn lab() -> Lab {
    let moto = Moto::start();
    let w = World::build(&moto.url()).await;
    let proxy = FaultProxy::start(moto.addr).await;
    Lab {
        w,
        proxy,
        _moto: moto,
    }
}

impl Lab {
    async fn node_a(
        &self,
        edit: impl FnOnce(&mut twinvol::config::cloud::CloudConfig),
    ) -> AwsCloud {
        AwsCloud::connect(&self.w.config(&self.w.a, &self.w.b, &self.proxy.url, edit))
            .await
            .unwrap()
    }
    async fn node_b(
        &self,
        edit: impl FnOnce(&mut twinvol::config::cloud::CloudConfig),
    ) -> AwsCloud {
        AwsCloud::connect(&self.w.config(&self.w.b, &self.w.a, &self.proxy.url, edit))
            .await
            .unwrap()
    }
}

fn failed_reason(o: &Outcome) -> &str {
    match o {
        Outcome::Failed(r) => r,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_moves_every_table_the_eip_and_the_record_from_a_to_b() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|_| {}).await;
    let b = lab.node_b(|_| {}).await;

    let ra = a.activate().await;
    assert!(ra.succeeded(), "{ra}");
    for t in &w.tables {
        let item = ra
            .get(&Resource::RouteTable(t.clone()))
            .unwrap_or_else(|| panic!("{t} not reported:\n{ra}"));
        assert!(matches!(item.outcome, Outcome::Applied(_)), "{item}");
    }
    assert!(
        ra.get(&Resource::RouteTable(w.main_table.clone()))
            .is_none(),
        "the main table holds no VIP and is not listed"
    );
    assert!(w.vip_tables_point_at(&w.a.eni).await);
    assert_eq!(w.eip_eni().await.as_deref(), Some(w.a.eni.as_str()));
    assert_eq!(w.record_values().await, vec![w.a.ip.clone()]);
    let dns = ra
        .items
        .iter()
        .find(|i| matches!(i.resource, Resource::DnsRecord(_)))
        .unwrap();
    assert!(
        matches!(dns.outcome, Outcome::Applied(_))
            && matches!(dns.propagation, Some(Propagation::InSync { .. })),
        "{dns}"
    );

    let rb = b.activate().await;
    assert!(rb.succeeded(), "{rb}");
    assert_eq!(rb.items.len(), 5, "3 tables + EIP + record:\n{rb}");
    assert!(
        rb.items
            .iter()
            .all(|i| matches!(i.outcome, Outcome::Applied(_))),
        "{rb}"
    );
    assert!(
        w.vip_tables_point_at(&w.b.eni).await,
        "{:?}",
        w.vip_targets().await
    );
    assert_eq!(w.eip_eni().await.as_deref(), Some(w.b.eni.as_str()));
    assert_eq!(w.record_values().await, vec![w.b.ip.clone()]);

    let again = b.activate().await;
    assert!(
        again.items.iter().all(|i| i.outcome == Outcome::Unchanged),
        "activation is idempotent:\n{again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_drift_of_a_table_changed_behind_its_back_and_reconcile_repairs_it() {
    let lab = lab().await;
    let w = &lab.w;
    let b = lab.node_b(|_| {}).await;
    assert!(b.activate().await.succeeded());
    let clean = b.check().await;
    assert!(clean.all_ok(), "{clean}");
    assert!(
        clean
            .get(&Resource::AvailabilityZone("us-east-1b".into()))
            .is_some(),
        "the AZ monitor runs:\n{clean}"
    );

    w.hijack(&w.tables[1], &w.a.eni).await;
    let seen = b.check().await;
    match seen.get(&Resource::RouteTable(w.tables[1].clone())) {
        Some(Health::Drift(d)) => {
            assert!(
                d.starts_with(&format!("The routing for VIP {VIP} was changed")),
                "{d}"
            );
            assert!(d.contains(&w.a.eni) && d.contains(&w.b.eni), "{d}");
        }
        other => panic!("expected drift, got {other:?}\n{seen}"),
    }
    assert_eq!(seen.drifted().count(), 1, "{seen}");
    assert!(seen.repairs.is_empty(), "observe-only by default");
    assert!(seen.wants_local_recovery());
    assert!(
        !w.vip_tables_point_at(&w.b.eni).await,
        "check did not touch anything"
    );

    let repaired = b.check_with(true).await;
    assert_eq!(repaired.repairs.len(), 1, "{repaired}");
    assert!(
        matches!(repaired.repairs[0].outcome, Outcome::Applied(_)),
        "{repaired}"
    );
    assert!(!repaired.wants_local_recovery());
    assert!(w.vip_tables_point_at(&w.b.eni).await);
    assert!(b.check().await.all_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_from_config_repairs_eip_and_record_drift() {
    let lab = lab().await;
    let w = &lab.w;
    let b = lab.node_b(|c| c.monitor.reconcile = true).await;
    assert!(b.activate().await.succeeded());
    w.ec2
        .associate_address()
        .allocation_id(&w.alloc)
        .network_interface_id(&w.a.eni)
        .allow_reassociation(true)
        .send()
        .await
        .unwrap();
    let a = lab.node_a(|_| {}).await;
    // Point the record at A behind B's back (A's own activation of the record only).
    let rec = &a.config().records[0];
    let r = twinvol::cloud::route53::activate(
        a.api(),
        rec,
        a.record_ip(rec),
        twinvol::cloud::aws::Deadline::after(Duration::from_secs(10)),
    )
    .await;
    assert!(r.succeeded(), "{r}");

    let c = b.check().await;
    match c.get(&Resource::ElasticIp(w.alloc.clone())) {
        Some(Health::Drift(d)) => assert!(d.contains(&w.a.eni), "{d}"),
        other => panic!("{other:?}\n{c}"),
    }
    match c
        .items
        .iter()
        .find(|(r, _)| matches!(r, Resource::DnsRecord(_)))
    {
        Some((_, Health::Drift(d))) => assert!(
            d.starts_with("IP address different from the setting is registered"),
            "{d}"
        ),
        other => panic!("{other:?}\n{c}"),
    }
    assert_eq!(c.repairs.len(), 2, "{c}");
    assert!(c.repairs.iter().all(|r| r.succeeded()), "{c}");
    assert_eq!(w.eip_eni().await.as_deref(), Some(w.b.eni.as_str()));
    assert_eq!(w.record_values().await, vec![w.b.ip.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_every_change_with_a_dry_run_verdict_and_changes_nothing() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|_| {}).await;
    let before = w.vip_targets().await;
    let plan = a.plan().await.unwrap();
    let text = plan
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(plan.len(), 5, "{text}");
    for t in &w.tables {
        let p = plan
            .iter()
            .find(|p| p.resource == Resource::RouteTable(t.clone()))
            .unwrap();
        assert_eq!(p.change.as_deref(), Some("ReplaceRoute"), "{text}");
        assert_eq!(p.dry_run, DryRun::WouldSucceed, "{text}");
        assert!(
            p.current.contains(&w.b.eni) && p.desired.contains(&w.a.eni),
            "{text}"
        );
    }
    let eip = plan
        .iter()
        .find(|p| matches!(p.resource, Resource::ElasticIp(_)))
        .unwrap();
    assert!(
        eip.change
            .as_deref()
            .unwrap()
            .starts_with("AssociateAddress"),
        "{text}"
    );
    assert_eq!(eip.dry_run, DryRun::WouldSucceed, "{text}");
    let dns = plan
        .iter()
        .find(|p| matches!(p.resource, Resource::DnsRecord(_)))
        .unwrap();
    assert_eq!(dns.current, "absent");
    assert_eq!(dns.dry_run, DryRun::NotOffered, "Route 53 has no dry run");
    assert_eq!(w.vip_targets().await, before, "plan changed a route");
    assert_eq!(w.eip_eni().await, None, "plan associated the EIP");
    assert!(w.record_values().await.is_empty(), "plan wrote the record");
    assert_eq!(
        lab.proxy.stats().of("ReplaceRoute"),
        3,
        "each table's change was dry-run once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_table_without_the_route_gets_it_created() {
    let lab = lab().await;
    let w = &lab.w;
    let main = w.main_table.clone();
    let a = lab
        .node_a(|c| c.vip_route.as_mut().unwrap().route_tables = vec![main.clone()])
        .await;
    let r = a.activate().await;
    let item = r.get(&Resource::RouteTable(main.clone())).unwrap();
    match &item.outcome {
        Outcome::Applied(what) => assert!(
            what.contains("CreateRoute") && what.contains("no route"),
            "{what}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(w
        .vip_targets()
        .await
        .iter()
        .any(|(t, e)| *t == main && *e == w.a.eni));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivation_disassociates_the_eip_and_deletes_the_record_only_where_configured() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab
        .node_a(|c| c.records[0].delete_on_deactivate = true)
        .await;
    assert!(a.activate().await.succeeded());
    let r = a.deactivate().await;
    assert!(r.succeeded(), "{r}");
    assert_eq!(r.items.len(), 2, "{r}");
    assert_eq!(w.eip_eni().await, None);
    assert!(w.record_values().await.is_empty());
    assert!(
        w.vip_tables_point_at(&w.a.eni).await,
        "routes stay until the peer takes them"
    );

    let b = lab
        .node_b(|c| c.eip.as_mut().unwrap().disassociate_on_deactivate = false)
        .await;
    assert!(b.activate().await.succeeded());
    assert!(
        b.deactivate().await.items.is_empty(),
        "nothing to release when neither option is set"
    );
    assert_eq!(w.eip_eni().await.as_deref(), Some(w.b.eni.as_str()));
    assert_eq!(w.record_values().await, vec![w.b.ip.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_report_a_missing_eip_and_a_missing_record_in_the_words_users_know() {
    let lab = lab().await;
    let w = &lab.w;
    let b = lab.node_b(|_| {}).await;
    assert!(b.activate().await.succeeded());
    w.ec2
        .disassociate_address()
        .association_id(
            w.ec2
                .describe_addresses()
                .allocation_ids(&w.alloc)
                .send()
                .await
                .unwrap()
                .addresses()[0]
                .association_id()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    w.ec2
        .release_address()
        .allocation_id(&w.alloc)
        .send()
        .await
        .unwrap();
    let rec = &b.config().records[0];
    // Delete the record behind twinvol's back.
    let a = lab
        .node_a(|c| c.records[0].delete_on_deactivate = true)
        .await;
    let _ = a; // A's config is only used for its delete path below.
    let del = {
        let st = twinvol::cloud::route53::observe(
            b.api(),
            rec,
            twinvol::cloud::aws::Deadline::after(Duration::from_secs(5)),
        )
        .await
        .unwrap()
        .unwrap();
        let set = aws_sdk_route53::types::ResourceRecordSet::builder()
            .name(RECORD)
            .r#type(aws_sdk_route53::types::RrType::A)
            .ttl(st.ttl.unwrap())
            .resource_records(
                aws_sdk_route53::types::ResourceRecord::builder()
                    .value(&st.values[0])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        w.r53
            .change_resource_record_sets()
            .hosted_zone_id(&w.zone)
            .change_batch(
                aws_sdk_route53::types::ChangeBatch::builder()
                    .changes(
                        aws_sdk_route53::types::Change::builder()
                            .action(aws_sdk_route53::types::ChangeAction::Delete)
                            .resource_record_set(set)
                            .build()
                            .unwrap(),
                    )
                    .build()
                    .unwrap(),
            )
            .send()
            .await
    };
    del.unwrap();
    let c = b.check().await;
    assert_eq!(
        c.get(&Resource::ElasticIp(w.alloc.clone())),
        Some(&Health::Drift(format!(
            "The EIP address does not exist (EIP ALLOCATION ID={})",
            w.alloc
        ))),
        "{c}"
    );
    match c
        .items
        .iter()
        .find(|(r, _)| matches!(r, Resource::DnsRecord(_)))
    {
        Some((_, Health::Drift(d))) => assert!(
            d.starts_with("The resource record set in Amazon Route 53 does not exist"),
            "{d}"
        ),
        other => panic!("{other:?}\n{c}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_names_every_misconfiguration() {
    let lab = lab().await;
    let w = &lab.w;
    // Healthy: every check passes.
    let a = lab.node_a(|_| {}).await;
    let ok = a.preflight().await;
    assert!(ok.iter().all(|c| c.result.is_ok()), "{ok:?}");

    // VIP inside the VPC CIDR, Source/Dest check on, ENI of the other instance.
    w.ec2
        .modify_network_interface_attribute()
        .network_interface_id(&w.a.eni)
        .source_dest_check(
            aws_sdk_ec2::types::AttributeBooleanValue::builder()
                .value(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let bad = lab
        .node_a(|c| {
            c.vip_route.as_mut().unwrap().vip = "10.0.5.5".parse().unwrap();
            c.node.network_interface = w.b.eni.clone();
        })
        .await;
    let checks = bad.preflight().await;
    let err = |name: &str| {
        checks
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.result.clone().err())
            .unwrap_or_else(|| panic!("{name} passed: {checks:?}"))
    };
    assert!(err("VIP outside the VPC CIDR").starts_with(&format!(
        "The VIP address 10.0.5.5 belongs to a VPC subnet (10.0.0.0/16 of {})",
        w.vpc
    )));
    assert!(err("ENI belongs to this instance").contains(&format!(
        "{} is attached to {}, not to this instance {}",
        w.b.eni, w.b.instance, w.a.instance
    )));
    let a2 = lab.node_a(|_| {}).await;
    let checks = a2.preflight().await;
    let sd = checks
        .iter()
        .find(|c| c.name == "Source/Dest check disabled")
        .unwrap()
        .result
        .clone()
        .unwrap_err();
    assert!(
        sd.starts_with(&format!("Source/Dest check is enabled on {}", w.a.eni)),
        "{sd}"
    );

    // Ids that do not exist.
    let ghost = lab
        .node_a(|c| {
            c.vip_route.as_mut().unwrap().vpc_id = "vpc-0000000000000dead".into();
            c.eip.as_mut().unwrap().allocation_id = "eipalloc-0000000000000dead".into();
            c.records[0].zone_id = "Z0000000000DEAD".into();
        })
        .await;
    let checks = ghost.preflight().await;
    let all = checks
        .iter()
        .filter_map(|c| c.result.clone().err())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        all.contains("The vpc ID 'vpc-0000000000000dead' does not exist"),
        "{all}"
    );
    assert!(
        all.contains("The allocation ID 'eipalloc-0000000000000dead' does not exist"),
        "{all}"
    );
    assert!(
        all.contains("No hosted zone found with ID: Z0000000000DEAD"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_an_unknown_eni_says_it_does_not_exist() {
    let lab = lab().await;
    let cfg = lab.w.config(&lab.w.a, &lab.w.b, &lab.proxy.url, |c| {
        c.node.network_interface = "eni-0000000000000dead".into()
    });
    let e = AwsCloud::connect(&cfg)
        .await
        .err()
        .expect("connect must fail")
        .to_string();
    assert!(
        e.starts_with("The networkInterface ID 'eni-0000000000000dead' does not exist"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_availability_zone_is_invalid() {
    let lab = lab().await;
    let a = lab.node_a(|_| {}).await;
    let (_, h) = az::check(
        a.api(),
        "us-east-1q",
        twinvol::cloud::aws::Deadline::after(Duration::from_secs(5)),
    )
    .await;
    assert_eq!(
        h,
        Health::Drift("Invalid availability zone: [us-east-1q]".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_stops_the_peer_and_waits_for_stopped() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|_| {}).await;
    let r = a.fence_peer().await;
    assert!(r.succeeded(), "{r}");
    assert!(
        matches!(&r.items[0].outcome, Outcome::Applied(s) if s.contains("stopped")),
        "{r}"
    );
    let st = w
        .ec2
        .describe_instances()
        .instance_ids(&w.b.instance)
        .send()
        .await
        .unwrap();
    assert_eq!(
        st.reservations()[0].instances()[0]
            .state()
            .unwrap()
            .name()
            .unwrap()
            .as_str(),
        "stopped"
    );
    assert_eq!(lab.proxy.stats().of("StopInstances"), 1);

    // The fenced node, once back, must not fence the survivor: its own instance is not running.
    let b = lab.node_b(|_| {}).await;
    let r = b.fence_peer().await;
    assert!(
        failed_reason(&r.items[0].outcome).contains("refusing to fence the peer"),
        "{r}"
    );
    assert_eq!(
        lab.proxy.stats().of("StopInstances"),
        1,
        "no second StopInstances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_instance_state_is_reported_without_changing_anything() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|_| {}).await;
    let r = a.peer_instance().await;
    assert!(
        matches!(&r, PeerInstance::Running(s) if s.contains(&w.b.instance) && s.contains("running")),
        "{r:?}"
    );
    assert_eq!(
        lab.proxy.stats().of("StopInstances"),
        0,
        "a query changes nothing"
    );
    w.ec2
        .stop_instances()
        .instance_ids(&w.b.instance)
        .send()
        .await
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        match a.peer_instance().await {
            PeerInstance::Stopped(s) => {
                assert!(s.contains("stopped"), "{s}");
                break;
            }
            other => assert!(
                t.elapsed() < Duration::from_secs(20),
                "never reported stopped: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let no_fence = lab.node_a(|c| c.fence = None).await;
    let r = no_fence.peer_instance().await;
    assert!(
        matches!(&r, PeerInstance::Unknown(s) if s.contains("peer_instance_id")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_ids_are_discovered_over_imdsv2() {
    let lab = lab().await;
    let w = &lab.w;
    let mac = "0e:00:00:00:00:0a";
    let imds = FakeImds::start(HashMap::from([
        ("instance-id".to_string(), w.a.instance.clone()),
        (
            "placement/availability-zone".to_string(),
            "us-east-1a".to_string(),
        ),
        ("placement/region".to_string(), "us-east-1".to_string()),
        ("network/interfaces/macs/".to_string(), format!("{mac}/")),
        (
            format!("network/interfaces/macs/{mac}/interface-id"),
            w.a.eni.clone(),
        ),
        (
            format!("network/interfaces/macs/{mac}/device-number"),
            "0".to_string(),
        ),
    ]))
    .await;
    let cfg = w.config(&w.a, &w.b, &lab.proxy.url, |c| {
        c.node.instance_id = "self".into();
        c.node.network_interface = "self".into();
        c.aws.region = Some("self".into());
        c.aws.endpoints.imds = Some(imds.url.clone());
    });
    let a = AwsCloud::connect(&cfg).await.unwrap();
    assert_eq!(a.identity().instance_id, w.a.instance);
    assert_eq!(a.identity().eni, w.a.eni);
    assert_eq!(a.identity().private_ip.to_string(), w.a.ip);
    assert!(a.activate().await.succeeded());
    assert!(w.vip_tables_point_at(&w.a.eni).await);
}

// ---- faults injected between the SDK and moto ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_calls_are_retried_and_activation_completes_within_its_deadline() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|_| {}).await;
    lab.proxy.inject(
        "ReplaceRoute",
        "",
        5,
        503,
        "RequestLimitExceeded",
        "Request limit exceeded.",
    );
    lab.proxy.inject(
        "AssociateAddress",
        "",
        2,
        503,
        "RequestLimitExceeded",
        "Request limit exceeded.",
    );
    lab.proxy.inject(
        "ChangeResourceRecordSets",
        "",
        2,
        400,
        "PriorRequestNotComplete",
        "The request was rejected because Route 53 was still processing a prior request.",
    );
    lab.proxy.inject(
        "ListResourceRecordSets",
        "",
        1,
        400,
        "Throttling",
        "Rate exceeded",
    );
    let r = a.activate().await;
    assert!(r.succeeded(), "{r}");
    assert!(r.elapsed < Duration::from_secs(30), "{r}");
    assert!(w.vip_tables_point_at(&w.a.eni).await);
    let s = lab.proxy.stats();
    assert_eq!(s.injected.get("ReplaceRoute"), Some(&5));
    assert_eq!(
        s.of("ReplaceRoute"),
        3 + 5,
        "every table switched once, after 5 throttled answers"
    );
    assert_eq!(s.injected.get("ChangeResourceRecordSets"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_that_outlasts_the_step_deadline_fails_that_table_with_a_clear_error() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|c| c.aws.step_timeout_s = 2).await;
    lab.proxy.inject(
        "ReplaceRoute",
        &w.tables[2],
        u32::MAX,
        503,
        "RequestLimitExceeded",
        "Request limit exceeded.",
    );
    let r = a.activate().await;
    let why = failed_reason(
        &r.get(&Resource::RouteTable(w.tables[2].clone()))
            .unwrap()
            .outcome,
    )
    .to_string();
    assert!(
        why.starts_with(&format!(
            "ec2 throttled ReplaceRoute on {} (RequestLimitExceeded) until the deadline",
            w.tables[2]
        )) || why.starts_with("Command was not completed within 2 seconds"),
        "{why}"
    );
    assert_eq!(r.failures().count(), 1, "only that table fails:\n{r}");
    assert!(r.elapsed < Duration::from_secs(5), "{r}");
    // The per-operation counters status and /metrics show: the failed table is one error;
    // the other tables' calls succeeded.
    let ops = a.api().stats().operations;
    let rr = ops.get("ec2:ReplaceRoute").expect("ReplaceRoute counted");
    assert_eq!(rr.errors, 1, "{ops:?}");
    assert!(rr.calls >= 3, "{ops:?}");
    assert!(
        ops.get("ec2:DescribeRouteTables")
            .is_some_and(|o| o.calls >= 1 && o.errors == 0),
        "{ops:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route53_pending_is_polled_until_insync_and_reported_apart_from_applied() {
    let lab = lab().await;
    let a = lab.node_a(|_| {}).await;
    lab.proxy.set(|f| f.pending_polls = 3);
    let r = a.activate().await;
    let dns = r
        .items
        .iter()
        .find(|i| matches!(i.resource, Resource::DnsRecord(_)))
        .unwrap();
    assert!(matches!(dns.outcome, Outcome::Applied(_)), "{dns}");
    match dns.propagation {
        Some(Propagation::InSync { after }) => assert!(
            after >= Duration::from_millis(150),
            "3 polls of 50 ms: {after:?}"
        ),
        ref other => panic!("{other:?}"),
    }
    assert_eq!(
        lab.proxy.stats().of("GetChange"),
        4,
        "3 PENDING answers, then INSYNC"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insync_wait_is_bounded_and_reported_as_not_yet_propagated() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|c| c.records[0].insync_timeout_s = 0.4).await;
    lab.proxy.set(|f| f.pending_polls = 1_000);
    let r = a.activate().await;
    assert!(r.succeeded(), "a slow propagation is not a failure:\n{r}");
    let dns = r
        .items
        .iter()
        .find(|i| matches!(i.resource, Resource::DnsRecord(_)))
        .unwrap();
    match dns.propagation {
        Some(Propagation::Pending { waited }) => assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
            "{waited:?}"
        ),
        ref other => panic!("{other:?}"),
    }
    assert!(dns.to_string().contains("not yet propagated"), "{dns}");
    assert_eq!(w.record_values().await, vec![w.a.ip.clone()], "applied");
    let polls = lab.proxy.stats().of("GetChange");
    assert!(
        (1..=9).contains(&polls),
        "at least one poll, at most one per 50 ms of the 0.4 s bound, got {polls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried_transparently() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|_| {}).await;
    lab.proxy.set(|f| f.drop_next = 2);
    let r = a.activate().await;
    assert!(r.succeeded(), "{r}");
    assert!(w.vip_tables_point_at(&w.a.eni).await);
    assert_eq!(lab.proxy.stats().injected.values().sum::<u64>(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_denial_on_one_table_is_reported_for_that_table_and_the_others_switch() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab.node_a(|_| {}).await;
    let denied = w.tables[1].clone();
    lab.proxy.inject(
        "ReplaceRoute",
        &denied,
        u32::MAX,
        403,
        "UnauthorizedOperation",
        "You are not authorized to perform this operation.",
    );
    let r = a.activate().await;
    assert!(!r.succeeded());
    let why = failed_reason(
        &r.get(&Resource::RouteTable(denied.clone()))
            .unwrap()
            .outcome,
    )
    .to_string();
    assert!(
        why.starts_with(&format!(
            "You are not authorized to perform this operation: ReplaceRoute on {denied}"
        )),
        "{why}"
    );
    assert_eq!(r.failures().count(), 1, "{r}");
    assert!(
        r.to_string()
            .contains(&format!("route table {denied}: FAILED")),
        "{r}"
    );
    let targets = w.vip_targets().await;
    for t in &w.tables {
        let e = &targets.iter().find(|(i, _)| i == t).unwrap().1;
        assert_eq!(
            e,
            if *t == denied { &w.b.eni } else { &w.a.eni },
            "{targets:?}"
        );
    }
    // The plan shows the denial before anything is tried.
    let plan = a.plan().await.unwrap();
    let p = plan
        .iter()
        .find(|p| p.resource == Resource::RouteTable(denied.clone()))
        .unwrap();
    assert!(
        matches!(&p.dry_run, DryRun::WouldFail(why) if why.starts_with("You are not authorized")),
        "{p}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_endpoint_fails_the_step_with_command_not_completed() {
    let lab = lab().await;
    let w = &lab.w;
    let a = lab
        .node_a(|c| {
            c.aws.step_timeout_s = 1;
            c.aws.read_timeout_ms = 30_000;
        })
        .await;
    lab.proxy
        .set(|f| f.hang_action = Some("ReplaceRoute".into()));
    let r = a.activate().await;
    assert!(r.elapsed < Duration::from_secs(4), "{r}");
    for t in &w.tables {
        let why =
            failed_reason(&r.get(&Resource::RouteTable(t.clone())).unwrap().outcome).to_string();
        assert!(
            why.starts_with(&format!(
                "Command was not completed within 1 seconds: ReplaceRoute on {t}"
            )),
            "{why}"
        );
    }
    assert!(
        r.get(&Resource::ElasticIp(w.alloc.clone()))
            .unwrap()
            .succeeded(),
        "the EIP does not wait for the routes:\n{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_activation_deadline_cuts_every_resource_and_reports_each() {
    let lab = lab().await;
    let a = lab
        .node_a(|c| {
            c.aws.step_timeout_s = 2;
            c.aws.activation_timeout_s = 2;
        })
        .await;
    lab.proxy.set(|f| f.latency = Duration::from_millis(700));
    let r = a.activate().await;
    assert!(r.elapsed < Duration::from_secs(4), "{r}");
    assert!(r.failures().count() >= 1, "{r}");
    for f in r.failures() {
        assert!(
            failed_reason(&f.outcome).starts_with("Command was not completed within 2 seconds"),
            "{f}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_makes_monitors_unknown_and_never_asks_for_failover() {
    let lab = lab().await;
    let b = lab.node_b(|c| c.aws.step_timeout_s = 2).await;
    assert!(b.activate().await.succeeded());
    lab.proxy
        .set(|f| f.hang_action = Some("DescribeRouteTables".into()));
    lab.proxy.inject(
        "*",
        "",
        u32::MAX,
        503,
        "ServiceUnavailable",
        "Service is unavailable",
    );
    let c = b.check().await;
    assert!(
        c.drifted().next().is_none(),
        "unreachable is not drift:\n{c}"
    );
    assert_eq!(c.unknown().count(), c.items.len(), "{c}");
    assert_eq!(c.on_unreachable, UnreachableAction::Warn);
    assert!(
        !c.wants_local_recovery(),
        "warn by default: no recovery, no failover"
    );
    let routes = c
        .items
        .iter()
        .find(|(r, _)| matches!(r, Resource::RouteTable(_)))
        .unwrap();
    assert!(
        matches!(&routes.1, Health::Unknown(d) if d.starts_with("Command was not completed within 2 seconds")),
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_named_as_credentials() {
    let lab = lab().await;
    lab.proxy.inject(
        "DescribeNetworkInterfaces",
        "",
        1,
        401,
        "AuthFailure",
        "AWS was not able to validate the provided access credentials",
    );
    let cfg = lab.w.config(&lab.w.a, &lab.w.b, &lab.proxy.url, |_| {});
    let e = AwsCloud::connect(&cfg)
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        e.starts_with("AWS credentials are missing or wrong (AuthFailure"),
        "{e}"
    );
    assert!(e.contains("instance profile"), "{e}");
}

/// The `[cloud]` TOML of the world nested into a whole twinvol config.
fn whole_config(cloud_toml: &str) -> twinvol::config::Config {
    let mut text = String::from(
        "[node]\nid = \"node-a\"\n[[volume]]\nname = \"data\"\ndevice = \"/dev/disk/by-id/x\"\n[volume.export]\nsocket = \"/run/x.sock\"\n[cloud]\n",
    );
    for line in cloud_toml.lines() {
        if let Some(rest) = line.strip_prefix("[[") {
            text.push_str(&format!("[[cloud.{rest}\n"));
        } else if let Some(rest) = line.strip_prefix('[') {
            text.push_str(&format!("[cloud.{rest}\n"));
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    twinvol::config::Config::parse(std::path::Path::new("test.toml"), &text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_preflight_plan_apply_check_in_order() {
    use twinvol::cloud::cli::{run, CloudCommand};
    let lab = lab().await;
    let w = &lab.w;
    let cfg = whole_config(&w.toml(&w.a, &w.b, &lab.proxy.url));
    let mut out = Vec::new();

    assert!(run(CloudCommand::Preflight { json: false }, &cfg, &mut out)
        .await
        .unwrap());
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.contains("ok    Source/Dest check disabled"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");

    out.clear();
    assert!(run(CloudCommand::Plan { json: false }, &cfg, &mut out)
        .await
        .unwrap());
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(
        text.contains("5 change(s) planned; nothing was changed"),
        "{text}"
    );
    assert!(text.contains(&format!("~ route table {}: {VIP}/32 -> {} -> {VIP}/32 -> {} via ReplaceRoute [dry run: would succeed]", w.tables[0], w.b.eni, w.a.eni)), "{text}");
    assert!(w.vip_tables_point_at(&w.b.eni).await);

    out.clear();
    assert!(
        !run(
            CloudCommand::Check {
                reconcile: false,
                json: false
            },
            &cfg,
            &mut out
        )
        .await
        .unwrap(),
        "A is not active yet: drift"
    );

    out.clear();
    assert!(run(
        CloudCommand::Apply {
            deactivate: false,
            json: true
        },
        &cfg,
        &mut out
    )
    .await
    .unwrap());
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(report["items"].as_array().unwrap().len(), 5, "{report}");
    assert!(w.vip_tables_point_at(&w.a.eni).await);

    out.clear();
    assert!(run(
        CloudCommand::Check {
            reconcile: false,
            json: false
        },
        &cfg,
        &mut out
    )
    .await
    .unwrap());
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.lines().all(|l| l.ends_with(": ok")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_monitor_waits_its_delay_then_reports_what_the_resolver_says() {
    use support::fake_dns::FakeDns;
    let lab = lab().await;
    let w = &lab.w;
    let dns = FakeDns::start().await;
    let a = lab
        .node_a(|c| {
            c.records[0].resolver = Some(dns.addr);
            c.records[0].resolve_delay_s = 0.5;
        })
        .await;
    let via = Resource::DnsRecord(format!("{RECORD} via {}", dns.addr));
    assert!(a.activate().await.succeeded());

    let early = a.check().await;
    assert!(
        early.get(&via).is_none(),
        "no query before the delay:\n{early}"
    );
    assert_eq!(
        dns.queries.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "an early query would cache NXDOMAIN"
    );

    tokio::time::sleep(Duration::from_millis(600)).await;
    let missing = a.check().await;
    match missing.get(&via) {
        Some(Health::Drift(d)) => assert!(
            d.starts_with(&format!(
                "Failed to resolve domain name: {RECORD} via {}: NXDOMAIN",
                dns.addr
            )),
            "{d}"
        ),
        other => panic!("{other:?}\n{missing}"),
    }

    dns.set(RECORD, &[w.b.ip.parse().unwrap()]);
    let stale = a.check().await;
    match stale.get(&via) {
        Some(Health::Drift(d)) => {
            assert!(
                d.starts_with(
                    "IP address resolved from the DNS resolver is different from the setting"
                ),
                "{d}"
            );
            assert!(d.contains(&w.b.ip) && d.contains(&w.a.ip), "{d}");
        }
        other => panic!("{other:?}\n{stale}"),
    }

    dns.set(RECORD, &[w.a.ip.parse().unwrap()]);
    let good = a.check().await;
    assert_eq!(good.get(&via), Some(&Health::Ok), "{good}");
    assert!(good.all_ok(), "{good}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_routing_keeps_one_health_checked_record_per_node() {
    use twinvol::config::cloud::{FailoverConfig, FailoverRole, RecordMode};
    let lab = lab().await;
    let w = &lab.w;
    let failover = |role| {
        move |c: &mut twinvol::config::cloud::CloudConfig| {
            c.records[0].mode = RecordMode::FailoverRouting;
            c.records[0].failover = Some(FailoverConfig {
                role,
                health_port: 8080,
                health_path: "/health".into(),
                health_ip: None,
                request_interval_s: 10,
                failure_threshold: 3,
            });
        }
    };
    let a = lab.node_a(failover(FailoverRole::Primary)).await;
    let b = lab.node_b(failover(FailoverRole::Secondary)).await;
    for (node, role) in [(&a, "PRIMARY"), (&b, "SECONDARY")] {
        let r = node.activate().await;
        assert!(r.succeeded(), "{r}");
        let dns = r
            .items
            .iter()
            .find(|i| matches!(&i.resource, Resource::DnsRecord(n) if n.contains(role)))
            .unwrap_or_else(|| panic!("{r}"));
        assert!(
            matches!(&dns.outcome, Outcome::Applied(s) if s.contains("health check")),
            "{dns}"
        );
    }

    let sets = w
        .r53
        .list_resource_record_sets()
        .hosted_zone_id(&w.zone)
        .send()
        .await
        .unwrap();
    let mut failover_sets: Vec<(String, String, String, bool)> = sets
        .resource_record_sets()
        .iter()
        .filter(|s| s.name() == RECORD)
        .map(|s| {
            (
                s.set_identifier().unwrap_or("").to_string(),
                s.failover()
                    .map(|f| f.as_str().to_string())
                    .unwrap_or_default(),
                s.resource_records()[0].value().to_string(),
                s.health_check_id().is_some(),
            )
        })
        .collect();
    failover_sets.sort();
    assert_eq!(
        failover_sets,
        vec![
            (
                "twinvol-primary".into(),
                "PRIMARY".into(),
                w.a.ip.clone(),
                true
            ),
            (
                "twinvol-secondary".into(),
                "SECONDARY".into(),
                w.b.ip.clone(),
                true
            ),
        ]
    );
    let checks = w.r53.list_health_checks().send().await.unwrap();
    assert_eq!(checks.health_checks().len(), 2);
    for hc in checks.health_checks() {
        let c = hc.health_check_config().unwrap();
        assert_eq!((c.port(), c.resource_path()), (Some(8080), Some("/health")));
    }

    let again = a.activate().await;
    let dns = again
        .items
        .iter()
        .find(|i| matches!(i.resource, Resource::DnsRecord(_)))
        .unwrap();
    assert_eq!(dns.outcome, Outcome::Unchanged, "{again}");
    assert_eq!(
        w.r53
            .list_health_checks()
            .send()
            .await
            .unwrap()
            .health_checks()
            .len(),
        2,
        "no second health check"
    );
    let plan = a.plan().await.unwrap();
    let dns_plan = plan
        .iter()
        .find(|p| matches!(p.resource, Resource::DnsRecord(_)))
        .unwrap();
    assert_eq!(dns_plan.change, None, "{dns_plan}");
    assert!(a.check().await.all_ok());

    // Delete A's health check behind its back: drift, then reconcile recreates and re-ties it.
    let mine = twinvol::cloud::route53_failover::find_health_check(
        a.api(),
        &twinvol::cloud::route53_failover::caller_reference(
            &a.config().records[0],
            FailoverRole::Primary,
        ),
        twinvol::cloud::aws::Deadline::after(Duration::from_secs(5)),
    )
    .await
    .unwrap()
    .unwrap();
    w.r53
        .delete_health_check()
        .health_check_id(&mine.id)
        .send()
        .await
        .unwrap();
    let c = a.check().await;
    match c
        .items
        .iter()
        .find(|(r, _)| matches!(r, Resource::DnsRecord(_)))
    {
        Some((_, Health::Drift(d))) => assert!(
            d.contains("health check") && d.contains("does not exist"),
            "{d}"
        ),
        other => panic!("{other:?}\n{c}"),
    }
    let repaired = a.check_with(true).await;
    assert_eq!(repaired.repairs.len(), 1, "{repaired}");
    assert!(repaired.repairs[0].succeeded(), "{repaired}");
    assert!(a.check().await.all_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_availability_zone_is_drift_that_reconcile_cannot_hide() {
    let lab = lab().await;
    let a = lab.node_a(|c| c.monitor.reconcile = true).await;
    assert!(a.activate().await.succeeded());
    lab.proxy.set(|f| {
        f.rewrites.push((
            "DescribeAvailabilityZones".into(),
            "<zoneState>available</zoneState>".into(),
            "<zoneState>impaired</zoneState>".into(),
        ))
    });
    let c = a.check().await;
    assert_eq!(
        c.get(&Resource::AvailabilityZone("us-east-1a".into())),
        Some(&Health::Drift(
            "availability zone us-east-1a is impaired, not available".into()
        )),
        "{c}"
    );
    assert!(c.repairs.is_empty(), "nothing to re-apply for an AZ: {c}");
    assert!(
        c.wants_local_recovery(),
        "an impaired AZ asks the cluster to recover"
    );
}
