//! The core without devices: real Cedar policies (the repository's `policies/`), a
//! virtual clock, plain IP packets for the enforcer and real boringtun clients for the
//! gateway.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::x25519::PublicKey;
use etherparse::PacketBuilder;
use portcullis_core::{
    Drop, Enforcer, FlowLimits, FlowState, Gateway, GatewayConfig, Injected, PeerCtx, PeerId,
    PeerSpec, Timeouts,
};
use portcullis_model::{
    ChangeKind, CloseReason, DeviceChange, Event, IdentityChange, Principal, Protocol, SignOn,
};
use portcullis_policy::{Engine, PolicyBundle};
use proptest::prelude::*;

mod common;
use common::*;

fn enforcer(limits: FlowLimits, t0: Instant) -> Enforcer {
    Enforcer::new(
        Engine::new(policies(), users()).expect("engine"),
        limits,
        t0,
        wall(),
    )
}

struct Who {
    id: PeerId,
    user: Arc<str>,
    device: Arc<str>,
    addrs: Vec<IpAddr>,
}

impl Who {
    fn new(id: u32, user: &str, addr: [u8; 4]) -> Who {
        Who {
            id: PeerId(id),
            user: user.into(),
            device: format!("{user}-key").into(),
            addrs: vec![
                IpAddr::from(addr),
                IpAddr::from([0xfd, 0, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, addr[3]]),
            ],
        }
    }
    fn ctx(&self) -> PeerCtx<'_> {
        PeerCtx {
            id: self.id,
            user: &self.user,
            device: &self.device,
            addresses: &self.addrs,
            routes: &[],
            session_id: 7,
            sign_on: SignOn::default(),
        }
    }
}

fn udp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut out, b"x")
        .expect("build");
    out
}

fn events(e: &mut Enforcer) -> Vec<Event> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

#[test]
fn tcp_flow_lifecycle_with_counters_and_close_event() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    assert_eq!(
        e.handle_outbound(
            t0,
            &alice.ctx(),
            &tcp(ALICE, 40000, PROD, 22, "S", 100, b"")
        ),
        Ok(())
    );
    let ev = events(&mut e);
    assert!(
        matches!(&ev[..], [Event::FlowOpened { user, policy_ids, network, tuple, .. }]
        if user == "alice" && policy_ids == &["sre-prod"] && network == "prod" && tuple.dst_port == 22)
    );
    // Server answers: return traffic goes to alice's peer.
    assert_eq!(
        e.handle_inbound(t0, &tcp(PROD, 22, ALICE, 40000, "SA", 900, b"")),
        Ok(PeerId(1))
    );
    let key = *e.flows().iter().next().expect("one flow").0;
    assert_eq!(
        e.flows().get(&key).map(|f| f.state),
        Some(FlowState::TcpEstablished)
    );
    assert_eq!(
        e.handle_outbound(
            t0,
            &alice.ctx(),
            &tcp(ALICE, 40000, PROD, 22, "A", 101, b"hello")
        ),
        Ok(())
    );
    assert_eq!(
        e.handle_outbound(
            t0,
            &alice.ctx(),
            &tcp(ALICE, 40000, PROD, 22, "AF", 106, b"")
        ),
        Ok(())
    );
    assert_eq!(
        e.flows().get(&key).map(|f| f.state),
        Some(FlowState::TcpHalfClosed)
    );
    assert_eq!(
        e.handle_inbound(t0, &tcp(PROD, 22, ALICE, 40000, "AF", 901, b"")),
        Ok(PeerId(1))
    );
    assert_eq!(
        e.flows().get(&key).map(|f| f.state),
        Some(FlowState::TcpClosing)
    );
    // Closing timeout (30 s) passes on the virtual clock.
    e.handle_timeout(t0 + Duration::from_secs(29));
    assert_eq!(e.flows().len(), 1);
    e.handle_timeout(t0 + Duration::from_secs(31));
    assert_eq!(e.flows().len(), 0);
    match &events(&mut e)[..] {
        [Event::FlowClosed {
            reason,
            outbound,
            inbound,
            duration_ms,
            ..
        }] => {
            assert_eq!(*reason, CloseReason::TcpClosed);
            assert_eq!(outbound.packets, 3);
            assert_eq!(inbound.packets, 2);
            assert!(outbound.bytes > inbound.bytes);
            assert_eq!(*duration_ms, 31_000);
        }
        other => panic!("expected one flow_closed, got {other:?}"),
    }
}

#[test]
fn return_traffic_only_for_flows_a_client_opened() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    // Nothing opened yet: the private network cannot reach alice.
    assert_eq!(
        e.handle_inbound(t0, &tcp(PROD, 22, ALICE, 40000, "S", 1, b"")),
        Err(Drop::NoFlow)
    );
    assert_eq!(
        e.handle_outbound(t0, &alice.ctx(), &udp(ALICE, 5000, PROD, 53)),
        Ok(())
    );
    assert_eq!(
        e.handle_inbound(t0, &udp(PROD, 53, ALICE, 5000)),
        Ok(PeerId(1))
    );
    // Another server port, another server, another client port: no flow.
    assert_eq!(
        e.handle_inbound(t0, &udp(PROD, 54, ALICE, 5000)),
        Err(Drop::NoFlow)
    );
    assert_eq!(
        e.handle_inbound(t0, &udp([10, 8, 0, 3], 53, ALICE, 5000)),
        Err(Drop::NoFlow)
    );
    assert_eq!(
        e.handle_inbound(t0, &udp(PROD, 53, ALICE, 5001)),
        Err(Drop::NoFlow)
    );
    // A server-side echo request is not a reply to alice's echo request.
    let mut ping = Vec::new();
    PacketBuilder::ipv4(ALICE, PROD, 64)
        .icmpv4_echo_request(9, 1)
        .write(&mut ping, b"p")
        .expect("build");
    assert_eq!(e.handle_outbound(t0, &alice.ctx(), &ping), Ok(()));
    let mut reply = Vec::new();
    PacketBuilder::ipv4(PROD, ALICE, 64)
        .icmpv4_echo_reply(9, 1)
        .write(&mut reply, b"p")
        .expect("build");
    assert_eq!(e.handle_inbound(t0, &reply), Ok(PeerId(1)));
    let mut req = Vec::new();
    PacketBuilder::ipv4(PROD, ALICE, 64)
        .icmpv4_echo_request(9, 2)
        .write(&mut req, b"p")
        .expect("build");
    assert_eq!(e.handle_inbound(t0, &req), Err(Drop::NoFlow));
}

#[test]
fn icmp_errors_follow_their_flow() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    let syn = tcp(ALICE, 40000, PROD, 22, "S", 1, b"");
    e.handle_outbound(t0, &alice.ctx(), &syn).expect("allowed");
    let too_big = |quoted: &[u8]| {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 8, 0, 1], ALICE, 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1280,
                },
            ))
            .write(&mut out, &quoted[..28])
            .expect("build");
        out
    };
    assert_eq!(e.handle_inbound(t0, &too_big(&syn)), Ok(PeerId(1)));
    let other = tcp(ALICE, 40001, PROD, 22, "S", 1, b"");
    assert_eq!(e.handle_inbound(t0, &too_big(&other)), Err(Drop::NoFlow));
}

#[test]
fn denied_flows_are_reported_once_per_interval_with_suppressed_count() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let bob = Who::new(2, "bob", BOB);
    let syn = tcp(BOB, 41000, PROD, 22, "S", 1, b"");
    for i in 0..4 {
        assert_eq!(
            e.handle_outbound(t0 + Duration::from_secs(i), &bob.ctx(), &syn),
            Err(Drop::Denied)
        );
    }
    match &events(&mut e)[..] {
        [Event::FlowDenied {
            user,
            tuple,
            network,
            policy_ids,
            suppressed,
            ..
        }] => {
            assert_eq!(user, "bob");
            assert_eq!(tuple.dst_ip, IpAddr::from(PROD));
            assert_eq!(tuple.dst_port, 22);
            assert_eq!(network, "prod");
            assert!(policy_ids.is_empty(), "no permit matched: {policy_ids:?}");
            assert_eq!(*suppressed, 0);
        }
        other => panic!("expected one flow_denied, got {other:?}"),
    }
    assert_eq!(
        e.handle_outbound(t0 + Duration::from_secs(11), &bob.ctx(), &syn),
        Err(Drop::Denied)
    );
    assert!(matches!(
        &events(&mut e)[..],
        [Event::FlowDenied { suppressed: 3, .. }]
    ));
    // bob may reach dev on 443; and a forbid names itself.
    assert_eq!(
        e.handle_outbound(t0, &bob.ctx(), &tcp(BOB, 41001, DEV, 443, "S", 1, b"")),
        Ok(())
    );
    assert_eq!(
        e.handle_outbound(t0, &bob.ctx(), &tcp(BOB, 41002, DEV, 23, "S", 1, b"")),
        Err(Drop::Denied)
    );
    let ev = events(&mut e);
    assert!(
        ev.iter().any(
            |x| matches!(x, Event::FlowDenied { policy_ids, .. } if policy_ids == &["no-telnet"])
        ),
        "{ev:?}"
    );
}

#[test]
fn spoofed_sources_are_dropped_counted_and_reported() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    for _ in 0..3 {
        assert_eq!(
            e.handle_outbound(t0, &alice.ctx(), &udp(BOB, 1, PROD, 53)),
            Err(Drop::Spoofed)
        );
    }
    assert_eq!(e.stats.spoofed, 3);
    assert_eq!(e.flows().len(), 0);
    match &events(&mut e)[..] {
        [Event::SpoofDropped {
            user, claimed_src, ..
        }] => {
            assert_eq!(user, "alice");
            assert_eq!(*claimed_src, IpAddr::from(BOB));
        }
        other => panic!("expected one spoof_dropped, got {other:?}"),
    }
}

#[test]
fn idle_timeouts_follow_the_protocol_on_a_virtual_clock() {
    let t0 = Instant::now();
    let limits = FlowLimits {
        timeouts: Timeouts {
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
            ..Timeouts::default()
        },
        ..FlowLimits::default()
    };
    let mut e = enforcer(limits, t0);
    let alice = Who::new(1, "alice", ALICE);
    e.handle_outbound(t0, &alice.ctx(), &udp(ALICE, 5000, PROD, 53))
        .expect("udp");
    let mut ping = Vec::new();
    PacketBuilder::ipv4(ALICE, PROD, 64)
        .icmpv4_echo_request(9, 1)
        .write(&mut ping, b"p")
        .expect("build");
    e.handle_outbound(t0, &alice.ctx(), &ping).expect("icmp");
    // Activity at +50 s keeps the UDP flow alive past its original deadline.
    assert_eq!(
        e.handle_inbound(t0 + Duration::from_secs(50), &udp(PROD, 53, ALICE, 5000)),
        Ok(PeerId(1))
    );
    e.handle_timeout(t0 + Duration::from_secs(31));
    assert_eq!(e.flows().len(), 1, "icmp expired at 30 s");
    e.handle_timeout(t0 + Duration::from_secs(100));
    assert_eq!(e.flows().len(), 1, "udp idle only 50 s");
    e.handle_timeout(t0 + Duration::from_secs(111));
    assert_eq!(e.flows().len(), 0);
    let reasons: Vec<_> = events(&mut e)
        .into_iter()
        .filter_map(|x| match x {
            Event::FlowClosed { reason, tuple, .. } => Some((tuple.protocol, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            (Protocol::ICMP, CloseReason::IdleTimeout),
            (Protocol::UDP, CloseReason::IdleTimeout)
        ]
    );
    // An expired flow's reply does not pass, even before the sweep runs.
    e.handle_outbound(t0, &alice.ctx(), &udp(ALICE, 6000, PROD, 53))
        .expect("udp");
    assert_eq!(
        e.handle_inbound(t0 + Duration::from_secs(61), &udp(PROD, 53, ALICE, 6000)),
        Err(Drop::NoFlow)
    );
}

fn fragment(
    src: [u8; 4],
    dst: [u8; 4],
    id: u16,
    offset_units: u16,
    more: bool,
    udp_ports: Option<(u16, u16)>,
) -> Vec<u8> {
    // An IPv4 UDP packet whose header fields say "fragment".
    let mut p = match udp_ports {
        Some((sp, dp)) => {
            let mut out = Vec::new();
            PacketBuilder::ipv4(src, dst, 64)
                .udp(sp, dp)
                .write(&mut out, &[0u8; 32])
                .expect("build");
            out
        }
        None => {
            let mut out = Vec::new();
            PacketBuilder::ipv4(src, dst, 64)
                .udp(1, 1)
                .write(&mut out, &[0u8; 32])
                .expect("build");
            out
        }
    };
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let flags_off = (u16::from(more) << 13) | offset_units;
    p[6..8].copy_from_slice(&flags_off.to_be_bytes());
    p
}

#[test]
fn later_fragments_pass_only_after_an_allowed_first_fragment() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    let bob = Who::new(2, "bob", BOB);
    // A later fragment with no first fragment seen: dropped.
    assert_eq!(
        e.handle_outbound(t0, &alice.ctx(), &fragment(ALICE, PROD, 7, 5, false, None)),
        Err(Drop::Fragment)
    );
    // First fragment allowed → its later fragments pass.
    assert_eq!(
        e.handle_outbound(
            t0,
            &alice.ctx(),
            &fragment(ALICE, PROD, 7, 0, true, Some((5000, 53)))
        ),
        Ok(())
    );
    assert_eq!(
        e.handle_outbound(t0, &alice.ctx(), &fragment(ALICE, PROD, 7, 5, false, None)),
        Ok(())
    );
    // Another id is still dropped.
    assert_eq!(
        e.handle_outbound(t0, &alice.ctx(), &fragment(ALICE, PROD, 8, 5, false, None)),
        Err(Drop::Fragment)
    );
    // A denied first fragment does not open the door for its later fragments.
    assert_eq!(
        e.handle_outbound(
            t0,
            &bob.ctx(),
            &fragment(BOB, PROD, 9, 0, true, Some((5000, 22)))
        ),
        Err(Drop::Denied)
    );
    assert_eq!(
        e.handle_outbound(t0, &bob.ctx(), &fragment(BOB, PROD, 9, 5, false, None)),
        Err(Drop::Fragment)
    );
    // Reply fragments: first one on the flow, then its later fragments.
    assert_eq!(
        e.handle_inbound(t0, &fragment(PROD, ALICE, 70, 0, true, Some((53, 5000)))),
        Ok(PeerId(1))
    );
    assert_eq!(
        e.handle_inbound(t0, &fragment(PROD, ALICE, 70, 5, false, None)),
        Ok(PeerId(1))
    );
    assert_eq!(
        e.handle_inbound(t0, &fragment(PROD, ALICE, 71, 5, false, None)),
        Err(Drop::Fragment)
    );
    // The record expires with the fragment timeout.
    e.handle_timeout(t0 + Duration::from_secs(31));
    assert_eq!(
        e.handle_outbound(
            t0 + Duration::from_secs(31),
            &alice.ctx(),
            &fragment(ALICE, PROD, 7, 6, false, None)
        ),
        Err(Drop::Fragment)
    );
    assert_eq!(e.stats.fragments_dropped, 5);
}

#[test]
fn a_full_table_evicts_the_least_recently_active_flow() {
    let t0 = Instant::now();
    let mut e = enforcer(
        FlowLimits {
            max_flows: 3,
            ..FlowLimits::default()
        },
        t0,
    );
    let alice = Who::new(1, "alice", ALICE);
    for (i, port) in [5001u16, 5002, 5003].iter().enumerate() {
        e.handle_outbound(
            t0 + Duration::from_secs(i as u64),
            &alice.ctx(),
            &udp(ALICE, *port, PROD, 53),
        )
        .expect("udp");
    }
    // 5001 is refreshed, so 5002 is the least recently active.
    e.handle_outbound(
        t0 + Duration::from_secs(4),
        &alice.ctx(),
        &udp(ALICE, 5001, PROD, 53),
    )
    .expect("udp");
    events(&mut e);
    e.handle_outbound(
        t0 + Duration::from_secs(5),
        &alice.ctx(),
        &udp(ALICE, 5004, PROD, 53),
    )
    .expect("udp");
    assert_eq!(e.flows().len(), 3);
    assert_eq!(e.stats.flows_evicted, 1);
    let ev = events(&mut e);
    assert!(
        matches!(&ev[0], Event::FlowClosed { reason: CloseReason::Evicted, tuple, .. } if tuple.src_port == 5002),
        "{ev:?}"
    );
    assert_eq!(
        e.handle_inbound(t0 + Duration::from_secs(5), &udp(PROD, 53, ALICE, 5002)),
        Err(Drop::NoFlow)
    );
    assert_eq!(
        e.handle_inbound(t0 + Duration::from_secs(5), &udp(PROD, 53, ALICE, 5001)),
        Ok(PeerId(1))
    );
}

fn bundle_without_sre() -> Arc<PolicyBundle> {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for f in ["schema.cedarschema", "networks.toml", "guardrails.cedar"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let access = std::fs::read_to_string(src.join("access.cedar")).expect("read");
    std::fs::write(
        dir.path().join("access.cedar"),
        access.replace("Group::\"sre\"", "Group::\"sre-disabled\""),
    )
    .expect("write");
    Arc::new(PolicyBundle::load(dir.path()).expect("load"))
}

#[test]
fn reload_that_removes_access_cuts_established_flows_with_resets() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    e.handle_outbound(
        t0,
        &alice.ctx(),
        &tcp(ALICE, 40000, PROD, 22, "S", 100, b""),
    )
    .expect("syn");
    e.handle_inbound(t0, &tcp(PROD, 22, ALICE, 40000, "SA", 5000, b""))
        .expect("syn-ack");
    e.handle_outbound(
        t0,
        &alice.ctx(),
        &tcp(ALICE, 40000, PROD, 22, "A", 101, b"abcd"),
    )
    .expect("data");
    e.handle_inbound(t0, &tcp(PROD, 22, ALICE, 40000, "A", 5001, b"xyz"))
        .expect("data");
    events(&mut e);
    let epoch = e.engine().epoch();
    let cut = e
        .handle_policy_bundle(t0, bundle_without_sre())
        .expect("reload");
    assert_eq!(cut, 1);
    assert!(e.engine().epoch() > epoch);
    let injected: Vec<Injected> = std::iter::from_fn(|| e.poll_injected()).collect();
    assert_eq!(injected.len(), 2, "{injected:?}");
    for inj in &injected {
        let (bytes, want_src, want_seq) = match inj {
            Injected::ToPeer(id, p) => {
                assert_eq!(*id, PeerId(1));
                (p, IpAddr::from(PROD), 5004u32)
            }
            Injected::ToTun(p) => (p, IpAddr::from(ALICE), 105u32),
        };
        let meta = portcullis_packet::parse(bytes).expect("rst parses");
        assert_eq!(meta.src, want_src);
        match meta.transport {
            portcullis_packet::Transport::Tcp { flags, seq, .. } => {
                assert!(flags & portcullis_packet::tcp_flags::RST != 0);
                assert_eq!(seq, want_seq, "rst seq for {inj:?}");
            }
            other => panic!("not tcp: {other:?}"),
        }
    }
    let ev = events(&mut e);
    assert!(
        matches!(
            &ev[0],
            Event::FlowClosed {
                reason: CloseReason::PolicyRevoked,
                ..
            }
        ),
        "{ev:?}"
    );
    assert!(
        matches!(&ev[1], Event::PolicyLoaded { flows_cut: 1, .. }),
        "{ev:?}"
    );
    // Later packets of the cut connection are decided anew, and denied.
    assert_eq!(
        e.handle_outbound(
            t0,
            &alice.ctx(),
            &tcp(ALICE, 40000, PROD, 22, "A", 105, b"more")
        ),
        Err(Drop::Denied)
    );
    assert_eq!(
        e.handle_inbound(t0, &tcp(PROD, 22, ALICE, 40000, "A", 5004, b"more")),
        Err(Drop::NoFlow)
    );
}

#[test]
fn losing_a_group_cuts_live_flows_at_once() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    e.handle_outbound(t0, &alice.ctx(), &udp(ALICE, 5000, PROD, 53))
        .expect("udp");
    let cut = e
        .handle_user_upsert(
            t0,
            Principal {
                name: "alice".into(),
                email: String::new(),
                groups: vec![],
                tags: vec![],
            },
        )
        .expect("upsert");
    assert_eq!(cut, 1);
    assert_eq!(e.flows().len(), 0);
}

#[test]
fn ipv6_flows_are_decided_and_tracked_like_ipv4() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    let client: [u8; 16] = [0xfd, 0, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let server: [u8; 16] = [0xfd, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let mut syn = Vec::new();
    PacketBuilder::ipv6(client, server, 64)
        .tcp(40000, 443, 1, 1000)
        .syn()
        .write(&mut syn, &[])
        .expect("build");
    assert_eq!(e.handle_outbound(t0, &alice.ctx(), &syn), Ok(()));
    let mut reply = Vec::new();
    PacketBuilder::ipv6(server, client, 64)
        .tcp(443, 40000, 9, 1000)
        .syn()
        .ack(2)
        .write(&mut reply, &[])
        .expect("build");
    assert_eq!(e.handle_inbound(t0, &reply), Ok(PeerId(1)));
    let bob = Who::new(2, "bob", BOB);
    let mut bob_syn = Vec::new();
    let bob_client: [u8; 16] = [0xfd, 0, 0, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    PacketBuilder::ipv6(bob_client, server, 64)
        .tcp(40000, 443, 1, 1000)
        .syn()
        .write(&mut bob_syn, &[])
        .expect("build");
    assert_eq!(
        e.handle_outbound(t0, &bob.ctx(), &bob_syn),
        Err(Drop::Denied)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_packets_never_panic_the_enforcer(
        packets in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..120)), 1..30),
        prefix in proptest::option::of(prop_oneof![Just(0x45u8), Just(0x60u8)]),
    ) {
        let t0 = Instant::now();
        let mut e = enforcer(FlowLimits { max_flows: 8, ..FlowLimits::default() }, t0);
        let alice = Who::new(1, "alice", ALICE);
        for (i, (outbound, mut bytes)) in packets.into_iter().enumerate() {
            if let (Some(p), Some(first)) = (prefix, bytes.first_mut()) {
                *first = p;
            }
            let now = t0 + Duration::from_millis(i as u64 * 700);
            if outbound {
                let _ = e.handle_outbound(now, &alice.ctx(), &bytes);
            } else {
                let _ = e.handle_inbound(now, &bytes);
            }
            e.handle_timeout(now);
        }
        while e.poll_event().is_some() {}
    }

    #[test]
    fn arbitrary_datagrams_never_panic_the_gateway(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        tun in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..10),
    ) {
        let t0 = Instant::now();
        let (mut gw, _) = gateway(t0);
        let mut out = vec![0u8; portcullis_core::MAX_PACKET];
        let from: SocketAddr = "192.168.1.2:5555".parse().expect("addr");
        for (i, mut d) in datagrams.into_iter().enumerate() {
            // Give some datagrams a valid WireGuard type so they reach deeper parsing.
            if let Some(first) = d.first_mut() { *first = (i % 5) as u8; }
            if d.len() > 3 { d[1] = 0; d[2] = 0; d[3] = 0; }
            let _ = gw.handle_datagram(t0, from, &d, &mut out);
        }
        for p in tun {
            let _ = gw.handle_tun_packet(t0, &p, &mut out);
        }
        gw.handle_timeout(t0 + Duration::from_secs(1));
        while gw.poll_transmit().is_some() {}
        while gw.poll_event().is_some() {}
    }
}

#[test]
fn wireguard_clients_handshake_and_are_enforced_both_ways() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let mut alice = Client::new(1, &gw_pub);
    let syn = tcp(ALICE, 40000, PROD, 22, "S", 1, b"");
    let forwarded = alice
        .send(&mut gw, t0, &syn)
        .expect("alice's syn reaches the tun device");
    assert_eq!(forwarded, syn);
    assert_eq!(gw.stats.handshakes, 1);
    // The reply from prod is encrypted to alice's endpoint and decrypts to the same bytes.
    let reply = tcp(PROD, 22, ALICE, 40000, "SA", 9, b"");
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    let (dst, datagram) = gw
        .handle_tun_packet(t0, &reply, &mut out)
        .expect("reply to alice");
    assert_eq!(dst, alice.addr);
    let datagram = datagram.to_vec();
    assert_eq!(alice.receive(&datagram), Some(reply));
    // Traffic for nobody's flow stays out.
    assert!(gw
        .handle_tun_packet(t0, &tcp(PROD, 22, ALICE, 40001, "SA", 9, b""), &mut out)
        .is_none());

    let mut bob = Client::new(2, &gw_pub);
    assert!(
        bob.send(&mut gw, t0, &tcp(BOB, 40000, PROD, 22, "S", 1, b""))
            .is_none(),
        "bob is denied prod"
    );
    // bob cannot claim alice's address.
    assert!(bob
        .send(&mut gw, t0, &tcp(ALICE, 40000, DEV, 443, "S", 1, b""))
        .is_none());
    assert!(bob
        .send(&mut gw, t0, &tcp(BOB, 40000, DEV, 443, "S", 1, b""))
        .is_some());

    let kinds: Vec<&str> = std::iter::from_fn(|| gw.poll_event())
        .map(|e| e.kind())
        .collect::<Vec<_>>()
        .leak()
        .to_vec();
    assert_eq!(
        kinds,
        [
            "peer_added",
            "peer_added",
            "session_started",
            "flow_opened",
            "session_started",
            "flow_denied",
            "spoof_dropped",
            "flow_opened"
        ]
    );
}

#[test]
fn unknown_keys_get_nothing() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let mut mallory = Client::new(9, &gw_pub);
    assert!(mallory
        .send(&mut gw, t0, &udp([100, 64, 0, 9], 1, PROD, 53))
        .is_none());
    assert_eq!(gw.stats.unknown_peer, 1);
    assert!(
        gw.poll_transmit().is_none(),
        "no handshake answer for an unknown key"
    );
}

fn change(user: &str, kind: ChangeKind, groups: Option<&[&str]>) -> IdentityChange {
    IdentityChange {
        source: "scim".into(),
        user: user.into(),
        kind,
        principal: groups.map(|g| Principal {
            name: user.into(),
            email: String::new(),
            groups: g.iter().map(|s| s.to_string()).collect(),
            tags: vec![],
        }),
    }
}

#[test]
fn revoking_a_user_cuts_session_and_flows_in_one_call_and_audits_the_latency() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let mut alice = Client::new(1, &gw_pub);
    alice
        .send(&mut gw, t0, &tcp(ALICE, 40000, PROD, 22, "S", 1, b""))
        .expect("syn");
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    gw.handle_tun_packet(t0, &tcp(PROD, 22, ALICE, 40000, "SA", 9, b""), &mut out)
        .expect("syn-ack");
    while gw.poll_event().is_some() {}
    let requested_at = wall() + chrono::Duration::milliseconds(3);
    let outcome = gw
        .handle_identity_change(
            t0 + Duration::from_millis(5),
            change("alice", ChangeKind::Deactivated, None),
            t0 + Duration::from_millis(3),
            requested_at,
        )
        .expect("revoke");
    assert_eq!((outcome.sessions_cut, outcome.flows_cut), (1, 1));
    assert_eq!(outcome.latency, Duration::from_millis(2));
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    let kinds: Vec<&'static str> = ev.iter().map(Event::kind).collect();
    assert_eq!(
        kinds,
        [
            "identity_changed",
            "flow_closed",
            "session_ended",
            "user_revoked"
        ]
    );
    match ev.last() {
        Some(Event::UserRevoked {
            user,
            source,
            latency_us,
            requested_at: r,
            applied_at,
            ..
        }) => {
            assert_eq!((user.as_str(), source.as_str()), ("alice", "scim"));
            assert_eq!(*latency_us, 2000);
            assert_eq!(*r, requested_at);
            assert_eq!(*applied_at, wall() + chrono::Duration::milliseconds(5));
        }
        other => panic!("{other:?}"),
    }
    // A reset went to alice through the tunnel before her keys were dropped.
    let rst = gw.poll_transmit().expect("rst to alice");
    let p = alice.receive(&rst.payload).expect("decrypts");
    let meta = portcullis_packet::parse(&p).expect("parses");
    assert!(
        matches!(meta.transport, portcullis_packet::Transport::Tcp { flags, .. } if flags & 4 != 0)
    );
    assert!(
        gw.poll_tun_packet().is_some(),
        "a reset went to the server too"
    );
    // Her tunnel carries nothing more, and a new handshake gets no answer.
    assert!(gw
        .handle_tun_packet(t0, &tcp(PROD, 22, ALICE, 40000, "A", 10, b""), &mut out)
        .is_none());
    let mut again = Client::new(1, &gw_pub);
    assert!(again
        .send(&mut gw, t0, &udp(ALICE, 5000, PROD, 53))
        .is_none());
    assert!(gw.stats.inactive_peer >= 1);
    assert!(gw.poll_transmit().is_none(), "no handshake answer");
    assert_eq!(gw.sessions(), vec![]);
}

#[test]
fn a_device_of_a_user_no_source_provides_yet_waits_until_the_user_exists() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let carol_key = client_key(3);
    gw.handle_peer_add(PeerSpec {
        user: "carol".into(),
        public_key: PublicKey::from(&carol_key).to_bytes(),
        addresses: vec![IpAddr::from([100, 64, 0, 4])],
        routes: Vec::new(),
        persistent_keepalive: None,
        sign_on: Default::default(),
    })
    .expect("peer");
    let carol_addr = [100, 64, 0, 4];
    let mut carol = Client::new(3, &gw_pub);
    assert!(carol
        .send(&mut gw, t0, &udp(carol_addr, 5000, PROD, 53))
        .is_none());
    assert!(gw.poll_transmit().is_none(), "no handshake answer");
    assert_eq!(gw.stats.inactive_peer, 1);

    // Created without groups: connected, but prod is denied.
    gw.handle_identity_change(
        t0,
        change("carol", ChangeKind::Created, Some(&[])),
        t0,
        wall(),
    )
    .expect("create");
    let mut carol = Client::new(3, &gw_pub);
    assert!(carol
        .send(&mut gw, t0, &tcp(carol_addr, 40000, PROD, 22, "S", 1, b""))
        .is_none());
    assert_eq!(gw.sessions().len(), 1);
    // Added to sre: prod opens.
    gw.handle_identity_change(
        t0,
        change("carol", ChangeKind::Updated, Some(&["sre"])),
        t0,
        wall(),
    )
    .expect("grant");
    carol
        .send(&mut gw, t0, &tcp(carol_addr, 40001, PROD, 22, "S", 1, b""))
        .expect("syn passes");
    assert_eq!(gw.enforcer().flows().len(), 1);
    // Removed from sre: the live flow is cut at once, without waiting for a packet.
    while gw.poll_event().is_some() {}
    let outcome = gw
        .handle_identity_change(
            t0,
            change("carol", ChangeKind::Updated, Some(&[])),
            t0,
            wall(),
        )
        .expect("ungrant");
    assert_eq!(outcome.flows_cut, 1);
    assert_eq!(gw.enforcer().flows().len(), 0);
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::FlowClosed {
                reason: CloseReason::PolicyRevoked,
                ..
            }
        )),
        "{ev:?}"
    );
    assert!(
        !ev.iter().any(|e| matches!(e, Event::UserRevoked { .. })),
        "losing a group is not a revocation of the user"
    );
    // The session itself stays: the user still exists.
    assert_eq!(gw.sessions().len(), 1);
}

#[test]
fn killing_a_session_cuts_its_flows_but_the_device_may_reconnect() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let mut alice = Client::new(1, &gw_pub);
    alice
        .send(&mut gw, t0, &udp(ALICE, 5000, PROD, 53))
        .expect("udp");
    let sessions = gw.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].user, "alice");
    assert_eq!(sessions[0].started, wall());
    assert!(!gw.handle_session_kill(t0, sessions[0].id + 1000, "admin"));
    assert!(gw.handle_session_kill(t0, sessions[0].id, "admin"));
    assert_eq!(gw.enforcer().flows().len(), 0);
    assert_eq!(gw.sessions(), vec![]);
    let mut alice = Client::new(1, &gw_pub);
    alice
        .send(&mut gw, t0, &udp(ALICE, 5001, PROD, 53))
        .expect("reconnects");
}

#[test]
fn sessions_end_after_idle_timeout() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let mut alice = Client::new(1, &gw_pub);
    alice
        .send(&mut gw, t0, &udp(ALICE, 5000, PROD, 53))
        .expect("udp");
    while gw.poll_event().is_some() {}
    gw.handle_timeout(t0 + Duration::from_secs(179));
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    assert!(
        !ev.iter().any(|e| matches!(e, Event::SessionEnded { .. })),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::FlowClosed {
                reason: CloseReason::IdleTimeout,
                ..
            }
        )),
        "{ev:?}"
    );
    gw.handle_timeout(t0 + Duration::from_secs(181));
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    assert!(ev.iter().any(|e| matches!(e, Event::SessionEnded { user, reason, .. } if user == "alice" && reason == "idle")), "{ev:?}");
}

#[test]
fn handshake_floods_get_cookie_replies_and_the_limiter_resets_every_second() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let mut alice = Client::new(1, &gw_pub);
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    let mut flood = |gw: &mut Gateway, n: usize| -> (usize, usize) {
        let (mut responses, mut cookies) = (0, 0);
        for _ in 0..n {
            let init = match alice.tunn.format_handshake_initiation(&mut alice.buf, true) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                other => panic!("no initiation: {other:?}"),
            };
            gw.handle_datagram(t0, alice.addr, &init, &mut out);
            while let Some(t) = gw.poll_transmit() {
                match t.payload.first() {
                    Some(2) => responses += 1,
                    Some(3) => cookies += 1,
                    other => panic!("unexpected message type {other:?}"),
                }
            }
        }
        (responses, cookies)
    };
    // Past HANDSHAKE_RATE_LIMIT initiations per second, the gateway answers with cookies.
    let (responses, cookies) = flood(&mut gw, 150);
    assert!(responses >= 1, "the first initiation is answered");
    assert!(
        cookies >= 40,
        "expected cookie replies under load, got {cookies}"
    );
    assert!(gw.stats.cookie_replies >= 40);
    // boringtun's limiter measures its second with its own clock: wait one, then tick.
    std::thread::sleep(Duration::from_millis(1100));
    gw.handle_timeout(t0 + Duration::from_secs(1));
    let (_, cookies_after) = flood(&mut gw, 5);
    assert_eq!(cookies_after, 0, "the counter was reset");
}

#[test]
fn multicast_from_the_private_side_is_dropped_and_counted_apart() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    // An MLD report as the kernel sends on the TUN device: fe80:: → ff02::16, ICMPv6 type 143.
    let src: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let dst: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
    let mut mld = Vec::new();
    PacketBuilder::ipv6(src, dst, 1)
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 143,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut mld, &[0; 20])
        .expect("build");
    assert_eq!(e.handle_inbound(t0, &mld), Err(Drop::NoFlow));
    assert_eq!(
        e.handle_inbound(t0, &udp(PROD, 53, [224, 0, 0, 251], 5353)),
        Err(Drop::NoFlow)
    );
    assert_eq!(e.stats.inbound_multicast, 2);
    assert_eq!(e.stats.inbound_no_flow, 0);
}

#[test]
fn a_registered_device_connects_and_its_removal_cuts_it_with_the_reason() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    while gw.poll_event().is_some() {}
    let key = PublicKey::from(&client_key(3)).to_bytes();
    let expires_at = wall() + chrono::Duration::hours(12);
    gw.handle_device_change(
        t0,
        DeviceChange::Added {
            user: "alice".into(),
            public_key: key,
            addresses: vec![IpAddr::from([100, 64, 0, 9])],
            routes: Vec::new(),
            persistent_keepalive: None,
            expires_at,
            previous: Some(PublicKey::from(&client_key(1)).to_bytes()),
            sign_on: Default::default(),
        },
    )
    .expect("add");
    let mut laptop = Client::new(3, &gw_pub);
    let syn = tcp([100, 64, 0, 9], 40000, PROD, 22, "S", 1, b"");
    assert_eq!(laptop.send(&mut gw, t0, &syn), Some(syn.clone()));
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    gw.handle_tun_packet(
        t0,
        &tcp(PROD, 22, [100, 64, 0, 9], 40000, "SA", 9, b""),
        &mut out,
    )
    .expect("syn-ack to the laptop");
    gw.handle_device_change(
        t0 + Duration::from_secs(1),
        DeviceChange::Removed {
            public_key: key,
            reason: "expired".into(),
        },
    )
    .expect("remove");
    // The reset for the open flow went out through the tunnel before the keys were dropped.
    let mut resets = 0;
    while let Some(t) = gw.poll_transmit() {
        if laptop.receive(&t.payload).is_some() {
            resets += 1;
        }
    }
    assert_eq!(resets, 1);
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    let kinds: Vec<&str> = ev.iter().map(Event::kind).collect();
    assert_eq!(
        kinds,
        [
            "key_rotated",
            "peer_added",
            "session_started",
            "flow_opened",
            "flow_closed",
            "session_ended",
            "peer_removed"
        ]
    );
    match (&ev[0], ev.last()) {
        (
            Event::KeyRotated {
                device,
                previous,
                expires_at: e,
                ..
            },
            Some(Event::PeerRemoved { reason, .. }),
        ) => {
            assert_eq!(device, &portcullis_core::b64(&key));
            assert_eq!(
                previous.as_deref(),
                Some(portcullis_core::b64(&PublicKey::from(&client_key(1)).to_bytes()).as_str())
            );
            assert_eq!(*e, Some(expires_at));
            assert_eq!(reason, "expired");
        }
        other => panic!("unexpected events {other:?}"),
    }
    // The removed key gets no handshake answer any more.
    let mut again = Client::new(3, &gw_pub);
    assert!(again
        .send(&mut gw, t0 + Duration::from_secs(2), &syn)
        .is_none());
    assert_eq!(gw.stats.unknown_peer, 1);
}

/// A change the policy entities refuse (here: a schema in which users have no groups,
/// and the source sends one) revokes the user in the core, through the same path as a
/// deactivation: fail closed, with the reason.
#[test]
fn a_refused_identity_change_revokes_the_user() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let schema = std::fs::read_to_string(src.join("schema.cedarschema")).expect("schema");
    std::fs::write(
        dir.path().join("schema.cedarschema"),
        schema.replace("entity User in [Group] {", "entity User {"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("open.cedar"),
        "@id(\"open\")\npermit(principal, action, resource);\n",
    )
    .expect("write");
    let bundle = Arc::new(PolicyBundle::load(dir.path()).expect("load"));
    let alice = Principal {
        name: "alice".into(),
        email: String::new(),
        groups: vec![],
        tags: vec![],
    };
    let mut gw = Gateway::new(
        GatewayConfig {
            private_key: GW_KEY,
            limits: FlowLimits::default(),
            session_idle_timeout: Duration::from_secs(180),
        },
        bundle,
        vec![alice],
        t0,
        wall(),
    )
    .expect("gateway");
    gw.handle_peer_add(PeerSpec {
        user: "alice".into(),
        public_key: PublicKey::from(&client_key(1)).to_bytes(),
        addresses: vec![IpAddr::from(ALICE)],
        routes: Vec::new(),
        persistent_keepalive: None,
        sign_on: Default::default(),
    })
    .expect("peer");
    let gw_pub = PublicKey::from(gw.public_key());
    let mut client = Client::new(1, &gw_pub);
    client
        .send(&mut gw, t0, &tcp(ALICE, 40000, PROD, 22, "S", 1, b""))
        .expect("allowed before");
    while gw.poll_event().is_some() {}
    let outcome = gw
        .handle_identity_change(
            t0,
            change("alice", ChangeKind::Updated, Some(&["sre"])),
            t0,
            wall(),
        )
        .expect("handled");
    assert!(outcome.refused.is_some(), "{outcome:?}");
    assert_eq!((outcome.sessions_cut, outcome.flows_cut), (1, 1));
    let kinds: Vec<&'static str> = std::iter::from_fn(|| gw.poll_event())
        .map(|e| e.kind())
        .collect();
    assert!(kinds.ends_with(&["user_revoked"]), "{kinds:?}");
    assert!(gw.enforcer().engine().user("alice").is_none());
}

/// A clock that advances 3 µs per reading: the decision it times took exactly 3 µs.
fn stepping_clock() -> Instant {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BASE: OnceLock<Instant> = OnceLock::new();
    static READS: AtomicU64 = AtomicU64::new(0);
    let n = READS.fetch_add(1, Ordering::Relaxed);
    *BASE.get_or_init(Instant::now) + Duration::from_micros(3 * n)
}

#[test]
fn first_packet_decisions_are_timed_with_the_lent_clock_and_only_those() {
    let t0 = Instant::now();
    let mut e = enforcer(FlowLimits::default(), t0);
    let alice = Who::new(1, "alice", ALICE);
    // Without a clock nothing is timed.
    assert_eq!(
        e.handle_outbound(t0, &alice.ctx(), &tcp(ALICE, 40000, PROD, 22, "S", 1, b"")),
        Ok(())
    );
    assert_eq!(e.stats.decision_latency.count(), 0);
    e.set_decision_clock(stepping_clock);
    // A new flow (allowed) and a new flow (denied: port 80 is not granted) are timed;
    // a packet of an existing flow is not.
    assert_eq!(
        e.handle_outbound(t0, &alice.ctx(), &tcp(ALICE, 40001, PROD, 22, "S", 1, b"")),
        Ok(())
    );
    let _ = e.handle_outbound(t0, &alice.ctx(), &tcp(ALICE, 40002, PROD, 80, "S", 1, b""));
    assert_eq!(
        e.handle_outbound(t0, &alice.ctx(), &tcp(ALICE, 40001, PROD, 22, "A", 2, b"x")),
        Ok(())
    );
    let l = e.stats.decision_latency;
    assert_eq!(l.count(), 2, "{l:?}");
    assert_eq!(l.sum_nanos, 6_000);
    // 3 µs falls in the (2 µs, 4 µs] bucket.
    assert_eq!(l.counts[2], 2);
    assert_eq!(e.stats.decisions, 3);
}

#[test]
fn a_revocation_cut_ahead_of_its_commit_is_recorded_once() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let mut alice = Client::new(1, &gw_pub);
    alice
        .send(&mut gw, t0, &tcp(ALICE, 40000, PROD, 22, "S", 1, b""))
        .expect("syn");
    while gw.poll_event().is_some() {}
    // The cut, before the identity store has committed.
    let early = gw
        .handle_revocation(
            t0 + Duration::from_millis(1),
            "alice".into(),
            "scim".into(),
            t0,
            wall(),
        )
        .expect("revoke");
    assert_eq!((early.sessions_cut, early.flows_cut), (1, 1));
    assert_eq!(early.latency, Duration::from_millis(1));
    // The committed change: recorded, nothing left to cut, no second user_revoked.
    let committed = gw
        .handle_identity_change(
            t0 + Duration::from_millis(9),
            change("alice", ChangeKind::Deactivated, None),
            t0,
            wall(),
        )
        .expect("committed change");
    assert_eq!((committed.sessions_cut, committed.flows_cut), (0, 0));
    let kinds: Vec<&'static str> = std::iter::from_fn(|| gw.poll_event())
        .map(|e| e.kind())
        .collect();
    assert_eq!(
        kinds,
        [
            "flow_closed",
            "session_ended",
            "user_revoked",
            "identity_changed"
        ]
    );
    // Granted again by a later change: the devices work again.
    gw.handle_identity_change(
        t0 + Duration::from_millis(20),
        change("alice", ChangeKind::Updated, Some(&["sre"])),
        t0,
        wall(),
    )
    .expect("grant");
    assert!(gw.peers().any(|(u, _, enabled)| u == "alice" && enabled));
}

/// prod-admin asks for a second factor from the last 12 hours (the example policies): a
/// device whose sign-on had one gets through; a new sign-on without one re-decides the
/// device's open flow at once and cuts it, and new flows are denied.
#[test]
fn a_devices_sign_on_decides_prod_admin_and_a_new_sign_on_without_mfa_cuts_it() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let key = PublicKey::from(&client_key(3)).to_bytes();
    let signed_on = wall().timestamp() - 60;
    gw.handle_device_change(
        t0,
        DeviceChange::Added {
            user: "alice".into(),
            public_key: key,
            addresses: vec![IpAddr::from([100, 64, 0, 9])],
            routes: Vec::new(),
            persistent_keepalive: None,
            expires_at: wall() + chrono::Duration::hours(12),
            previous: None,
            sign_on: SignOn {
                at: signed_on,
                mfa: true,
            },
        },
    )
    .expect("add");
    while gw.poll_event().is_some() {}
    let admin = [10, 8, 100, 5];
    let mut laptop = Client::new(3, &gw_pub);
    let syn = tcp([100, 64, 0, 9], 40000, admin, 22, "S", 1, b"");
    assert_eq!(
        laptop.send(&mut gw, t0, &syn),
        Some(syn.clone()),
        "MFA a minute ago"
    );
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    gw.handle_tun_packet(
        t0,
        &tcp(admin, 22, [100, 64, 0, 9], 40000, "SA", 9, b""),
        &mut out,
    )
    .expect("syn-ack to the laptop");
    while gw.poll_transmit().is_some() {}

    gw.handle_device_change(
        t0 + Duration::from_secs(1),
        DeviceChange::SignedOn {
            public_key: key,
            sign_on: SignOn {
                at: signed_on + 1,
                mfa: false,
            },
        },
    )
    .expect("signed on");
    let mut resets = 0;
    while let Some(t) = gw.poll_transmit() {
        if laptop.receive(&t.payload).is_some() {
            resets += 1;
        }
    }
    assert_eq!(resets, 1, "the open flow is reset");
    let again = tcp([100, 64, 0, 9], 40001, admin, 22, "S", 1, b"");
    assert_eq!(
        laptop.send(&mut gw, t0 + Duration::from_secs(2), &again),
        None
    );
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    assert!(
        ev.iter().any(|e| matches!(e, Event::FlowClosed { reason, .. } if *reason == CloseReason::PolicyRevoked)),
        "{ev:?}"
    );
    assert!(
        ev.iter().any(|e| matches!(e, Event::FlowDenied { policy_ids, .. } if policy_ids == &["prod-admin-needs-recent-mfa"])),
        "{ev:?}"
    );
    // Other flows of the user are untouched by the policy: prod itself needs no MFA.
    let prod = tcp([100, 64, 0, 9], 40002, PROD, 22, "S", 1, b"");
    assert_eq!(
        laptop.send(&mut gw, t0 + Duration::from_secs(3), &prod),
        Some(prod.clone())
    );
}

/// A temporary grant: bob (developers, no prod) reaches prod-db on 5432/tcp while it
/// lasts, the flow names the grant; at its end the loop's own timer resets the open
/// connection and new ones are denied; a revoked grant (a new set without it) cuts at once.
#[test]
fn a_grant_allows_what_it_names_until_its_end_and_its_end_resets_the_flow() {
    let t0 = Instant::now();
    let (mut gw, gw_pub) = gateway(t0);
    let db = [10, 8, 5, 9];
    let end = wall().timestamp_millis() + 30_000;
    let grant = portcullis_model::Grant {
        id: "ar-0001".into(),
        user: "bob".into(),
        network: "prod-db".into(),
        dst: None,
        port: Some(5432),
        protocol: Some(portcullis_model::Protocol::TCP),
        start_ms: wall().timestamp_millis() - 1000,
        end_ms: end,
    };
    let mut bob = Client::new(2, &gw_pub);
    let syn = tcp(BOB, 40000, db, 5432, "S", 1, b"");
    assert_eq!(bob.send(&mut gw, t0, &syn), None, "no grant yet");
    assert_eq!(gw.handle_grants(t0, vec![grant.clone()]), 0);
    let syn = tcp(BOB, 40001, db, 5432, "S", 1, b"");
    assert_eq!(bob.send(&mut gw, t0, &syn), Some(syn.clone()), "granted");
    let ssh = tcp(BOB, 40002, db, 22, "S", 1, b"");
    assert_eq!(bob.send(&mut gw, t0, &ssh), None, "only the port granted");
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    gw.handle_tun_packet(t0, &tcp(db, 5432, BOB, 40001, "SA", 9, b""), &mut out)
        .expect("syn-ack to bob");
    while gw.poll_transmit().is_some() {}
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::FlowOpened { policy_ids, .. } if policy_ids == &["ar-0001"])
        ),
        "{ev:?}"
    );
    assert_eq!(gw.enforcer().poll_grant_end(), Some(end));

    // Just before the end nothing happens; a tick after it the flow is reset.
    let before = t0 + Duration::from_secs(29);
    gw.handle_timeout(before);
    assert!(gw.poll_transmit().is_none());
    let after = t0 + Duration::from_millis(30_250);
    gw.handle_timeout(after);
    let mut resets = 0;
    while let Some(t) = gw.poll_transmit() {
        if bob.receive(&t.payload).is_some() {
            resets += 1;
        }
    }
    assert_eq!(resets, 1, "the open connection is reset at the grant's end");
    let ev: Vec<Event> = std::iter::from_fn(|| gw.poll_event()).collect();
    assert!(
        ev.iter().any(|e| matches!(e, Event::FlowClosed { reason, policy_ids, .. } if *reason == CloseReason::PolicyRevoked && policy_ids == &["ar-0001"])),
        "{ev:?}"
    );
    let again = tcp(BOB, 40003, db, 5432, "S", 1, b"");
    assert_eq!(bob.send(&mut gw, after, &again), None, "ended");
    assert_eq!(gw.enforcer().poll_grant_end(), None);

    // A grant withdrawn before its end cuts at once.
    let t1 = after + Duration::from_secs(1);
    let renewed = portcullis_model::Grant {
        id: "ar-0002".into(),
        end_ms: wall().timestamp_millis() + 3_600_000,
        ..grant
    };
    gw.handle_grants(t1, vec![renewed]);
    let syn = tcp(BOB, 40004, db, 5432, "S", 1, b"");
    assert_eq!(bob.send(&mut gw, t1, &syn), Some(syn.clone()));
    while gw.poll_transmit().is_some() {}
    assert_eq!(gw.handle_grants(t1, Vec::new()), 1, "revoked: cut");
}
