//! Per-packet cost of the data plane.
//!
//! - `established/outbound`, `established/inbound`: a packet of an established flow,
//!   excluding crypto: parse + anti-spoofing + flow lookup + counters + TCP state.
//! - `parse_only`: etherparse slicing of the same packet, for comparison.
//! - `first_packet/plain_cedar`, `first_packet/fast_cached`: a new flow's decision through
//!   plain Cedar over the example set, and through the engine's fast path (cache hit).
//! - `gateway/datagram_1400`: the whole inbound path with ChaCha20-Poly1305 decryption.
//!
//! Run: `cargo bench -p portcullis-core --bench per_packet`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use portcullis_core::{Enforcer, FlowLimits, Gateway, GatewayConfig, PeerCtx, PeerId, PeerSpec};
use portcullis_model::Principal;
use portcullis_policy::{Engine, PolicyBundle};

fn bundle() -> Arc<PolicyBundle> {
    Arc::new(
        PolicyBundle::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")).unwrap(),
    )
}

fn users() -> Vec<Principal> {
    vec![Principal {
        name: "alice".into(),
        email: "alice@example.com".into(),
        groups: vec!["sre".into()],
        tags: vec!["oncall".into()],
    }]
}

fn tcp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .tcp(sp, dp, 1000, 64000)
        .ack(1)
        .write(&mut out, &vec![0x5a; payload])
        .unwrap();
    out
}

fn per_packet(c: &mut Criterion) {
    let t0 = Instant::now();
    let wall = "2026-11-22T10:00:00Z".parse().unwrap();
    let mut e = Enforcer::new(
        Engine::new(bundle(), users()).unwrap(),
        FlowLimits::default(),
        t0,
        wall,
    );
    let user: Arc<str> = "alice".into();
    let device: Arc<str> = "key".into();
    let addrs = [IpAddr::from([100, 64, 0, 2])];
    let ctx = PeerCtx {
        id: PeerId(1),
        user: &user,
        device: &device,
        addresses: &addrs,
        routes: &[],
        session_id: 1,
        sign_on: Default::default(),
    };
    let out = tcp([100, 64, 0, 2], 40000, [10, 8, 0, 2], 22, 1360);
    let back = tcp([10, 8, 0, 2], 22, [100, 64, 0, 2], 40000, 1360);
    // Background flows so the lookup is not in a one-entry table.
    for port in 1..10_000u16 {
        e.handle_outbound(t0, &ctx, &tcp([100, 64, 0, 2], port, [10, 8, 0, 3], 443, 0))
            .unwrap();
    }
    e.handle_outbound(t0, &ctx, &out).unwrap();
    while e.poll_event().is_some() {}

    let mut g = c.benchmark_group("established");
    g.throughput(Throughput::Elements(1));
    g.bench_function("outbound", |b| {
        b.iter(|| e.handle_outbound(t0, &ctx, black_box(&out)))
    });
    g.bench_function("inbound", |b| {
        b.iter(|| e.handle_inbound(t0, black_box(&back)))
    });
    g.finish();

    c.bench_function("parse_only", |b| {
        b.iter(|| portcullis_packet::parse(black_box(&out)))
    });

    let mut engine = Engine::new(bundle(), users()).unwrap();
    let req = portcullis_model::FlowRequest {
        src_ip: IpAddr::from([100, 64, 0, 2]),
        dst_ip: IpAddr::from([10, 8, 5, 4]),
        dst_port: 5432,
        protocol: portcullis_model::Protocol::TCP,
        device: "key".into(),
        mfa: false,
        authenticated_at: 0,
    };
    c.bench_function("first_packet/plain_cedar", |b| {
        b.iter(|| engine.decide_plain("alice", black_box(&req), wall))
    });
    c.bench_function("first_packet/fast_cached", |b| {
        b.iter(|| engine.decide("alice", black_box(&req), wall))
    });
}

fn gateway_path(c: &mut Criterion) {
    let t0 = Instant::now();
    let wall = "2026-11-22T10:00:00Z".parse().unwrap();
    let client_secret = StaticSecret::from([1u8; 32]);
    let mut gw = Gateway::new(
        GatewayConfig {
            private_key: [7; 32],
            limits: FlowLimits::default(),
            session_idle_timeout: std::time::Duration::from_secs(180),
        },
        bundle(),
        users(),
        t0,
        wall,
    )
    .unwrap();
    gw.handle_peer_add(PeerSpec {
        user: "alice".into(),
        public_key: PublicKey::from(&client_secret).to_bytes(),
        addresses: vec![IpAddr::from([100, 64, 0, 2])],
        routes: Vec::new(),
        persistent_keepalive: None,
        sign_on: Default::default(),
    })
    .unwrap();
    let mut client = Tunn::new(
        client_secret,
        PublicKey::from(gw.public_key()),
        None,
        None,
        1,
        None,
    );
    let from: SocketAddr = "192.168.1.2:5000".parse().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; portcullis_core::MAX_PACKET];
    let packet = tcp([100, 64, 0, 2], 40000, [10, 8, 0, 2], 22, 1360);
    // Handshake.
    let init = match client.encapsulate(&packet, &mut buf) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no handshake"),
    };
    gw.handle_datagram(t0, from, &init, &mut out);
    let resp = gw.poll_transmit().unwrap();
    let mut queued = Vec::new();
    if let TunnResult::WriteToNetwork(d) = client.decapsulate(None, &resp.payload, &mut buf) {
        queued.push(d.to_vec());
    }
    while let TunnResult::WriteToNetwork(d) = client.decapsulate(None, &[], &mut buf) {
        queued.push(d.to_vec());
    }
    for d in queued {
        gw.handle_datagram(t0, from, &d, &mut out);
    }
    // Fresh datagrams each time (replay protection rejects repeats); encryption is
    // done in chunks outside the timed region.
    let mut g = c.benchmark_group("gateway");
    g.throughput(Throughput::Bytes(packet.len() as u64));
    g.sample_size(10);
    g.bench_function("datagram_1400", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(10_000);
                left -= chunk;
                let datagrams: Vec<Vec<u8>> = (0..chunk)
                    .map(|_| match client.encapsulate(&packet, &mut buf) {
                        TunnResult::WriteToNetwork(d) => d.to_vec(),
                        _ => panic!("no session"),
                    })
                    .collect();
                let start = Instant::now();
                for d in &datagrams {
                    black_box(gw.handle_datagram(t0, from, d, &mut out).is_some());
                }
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(4));
    targets = per_packet, gateway_path
}
criterion_main!(benches);
