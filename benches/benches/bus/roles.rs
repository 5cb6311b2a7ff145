//! Roles (child processes): the broker, the bus clients (blocking `Client`
//! and raw), the Unix-socket ping-pong and the Mosquitto and NATS clients,
//! each chosen by `DAEMONEYE_BENCH_BUS_ROLE`.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use daemoneye_bus::{Broker, BrokerConfig, Client, ClientConfig, Frame, Overflow};

use super::common::{count, env, env_num, flood, measure, other, say};
use super::mqtt::Mqtt;
use super::nats::Nats;
use super::raw::RawBus;
use super::{ADDR, COUNT, FLOOD_TOPIC, ID, IDLE, OVERFLOW, PAYLOAD, QUEUE_MSGS, RPC_TOPIC, SECS};

pub(super) fn role_main(role: &str) -> ExitCode {
    let addr = env(ADDR);
    let path = PathBuf::from(&addr);
    let payload = vec![0xa5u8; env_num(PAYLOAD, 64) as usize];
    let n = env_num(COUNT, 20_000) as usize;
    let secs = env_num(SECS, 2_000) as f64 / 1000.0;
    let id = env(ID);
    let res: io::Result<ExitCode> = match role {
        "broker" => {
            let mut cfg = BrokerConfig::new(&path);
            if let Ok(m) = std::env::var(QUEUE_MSGS)
                && let Ok(m) = m.parse()
            {
                cfg.queue_limit_msgs = m;
            }
            match Broker::start(cfg) {
                Ok(_broker) => {
                    say("ready");
                    // Parked until the harness kills this process.
                    let (_tx, rx) = crossbeam_channel::bounded::<()>(0);
                    let _ = rx.recv();
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(other(e)),
            }
        }
        "client-responder" => (|| {
            let client = client(&path, "responder")?;
            let sub = client.subscribe(RPC_TOPIC).map_err(other)?;
            client.publish_confirmed("bench.sync", b"").map_err(other)?;
            say("ready");
            while let Ok(m) = sub.messages().recv() {
                client.reply(&m, &payload).map_err(other)?;
            }
            Ok(ExitCode::SUCCESS)
        })(),
        "client-requester" => (|| {
            let client = client(&path, "requester")?;
            let t = Duration::from_secs(5);
            let lat = measure(n, || client.request(RPC_TOPIC, &payload, t).map(drop).map_err(other))?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "raw-responder" => (|| {
            let mut bus = RawBus::connect(&path, "rawresp")?;
            bus.subscribe(RPC_TOPIC, Overflow::Block)?;
            say("ready");
            let mut reply = String::new();
            loop {
                let got = bus.next(|f| match f {
                    Frame::Deliver { reply_to: Some(r), .. } => {
                        reply.clear();
                        reply.push_str(r);
                        true
                    }
                    _ => false,
                })?;
                if got {
                    bus.queue(&Frame::Publish {
                        topic: &reply,
                        payload: &payload,
                        reply_to: None,
                        ack_id: None,
                    })?;
                    bus.flush()?;
                }
            }
        })(),
        "raw-requester" => (|| {
            let mut bus = RawBus::connect(&path, "rawreq")?;
            bus.subscribe("direct.rawreq.#", Overflow::Block)?;
            let lat = measure(n, || {
                let f = Frame::Publish {
                    topic: RPC_TOPIC,
                    payload: &payload,
                    reply_to: Some("direct.rawreq.r"),
                    ack_id: None,
                };
                bus.queue(&f)?;
                bus.flush()?;
                while !bus.next(|f| matches!(f, Frame::Deliver { .. }))? {}
                Ok(())
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "uds-pong" => (|| {
            let l = UnixListener::bind(&path)?;
            say("ready");
            let (mut s, _) = l.accept()?;
            let mut buf = payload.clone();
            loop {
                if s.read_exact(&mut buf).is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
                s.write_all(&buf)?;
            }
        })(),
        "uds-ping" => (|| {
            let mut s = UnixStream::connect(&path)?;
            let mut buf = payload.clone();
            let lat = measure(n, || {
                s.write_all(&payload)?;
                s.read_exact(&mut buf)
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "client-sub" => (|| {
            let client = client(&path, &id)?;
            let overflow =
                if env(OVERFLOW) == "drop-newest" { Overflow::DropNewest } else { Overflow::Block };
            let sub = client.subscribe_with(FLOOD_TOPIC, None, overflow).map_err(other)?;
            client.publish_confirmed("bench.sync", b"").map_err(other)?;
            say("ready");
            let rx = sub.messages().clone();
            Ok(count(
                || rx.recv_timeout(IDLE).ok().map(|m| m.payload.is_empty()),
                || format!("client_dropped={}", client.dropped()),
            ))
        })(),
        "client-pub" => (|| {
            let client = client(&path, "publisher")?;
            let pl = &payload;
            let c = &client;
            Ok(flood(
                secs,
                || c.publish(FLOOD_TOPIC, pl).map_err(other),
                || c.publish_confirmed(FLOOD_TOPIC, b"").map_err(other),
            ))
        })(),
        "raw-sub" => (|| {
            let mut bus = RawBus::connect(&path, &id)?;
            bus.subscribe(FLOOD_TOPIC, Overflow::Block)?;
            bus.s.set_read_timeout(Some(IDLE))?;
            say("ready");
            Ok(count(
                || loop {
                    match bus.next(|f| match f {
                        Frame::Deliver { payload, .. } => Some(payload.is_empty()),
                        _ => None,
                    }) {
                        Ok(Some(end)) => return Some(end),
                        Ok(None) => {}
                        Err(_) => return None,
                    }
                },
                String::new,
            ))
        })(),
        "raw-pub" => (|| {
            let mut bus = RawBus::connect(&path, "rawpub")?;
            let mut pending = 0;
            let code = {
                let b = std::cell::RefCell::new(&mut bus);
                flood(
                    secs,
                    || {
                        let mut bus = b.borrow_mut();
                        let f = Frame::Publish {
                            topic: FLOOD_TOPIC,
                            payload: &payload,
                            reply_to: None,
                            ack_id: None,
                        };
                        bus.queue(&f)?;
                        pending += 1;
                        if pending == 128 {
                            pending = 0;
                            bus.flush()?;
                        }
                        Ok(())
                    },
                    || {
                        let mut bus = b.borrow_mut();
                        let f =
                            Frame::Publish { topic: FLOOD_TOPIC, payload: b"", reply_to: None, ack_id: None };
                        bus.queue(&f)?;
                        bus.queue(&Frame::Ping(9))?;
                        bus.flush()?;
                        while !bus.next(|f| matches!(f, Frame::Pong(9)))? {}
                        Ok(())
                    },
                )
            };
            Ok(code)
        })(),
        "mqtt-responder" => (|| {
            let mut m = Mqtt::connect(&path, "responder")?;
            m.subscribe("bench/req")?;
            say("ready");
            loop {
                m.next_publish()?;
                m.publish("bench/reply", &payload)?;
                m.w.flush()?;
            }
        })(),
        "mqtt-requester" => (|| {
            let mut m = Mqtt::connect(&path, "requester")?;
            m.subscribe("bench/reply")?;
            let lat = measure(n, || {
                m.publish("bench/req", &payload)?;
                m.w.flush()?;
                m.next_publish().map(drop)
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "mqtt-sub" => (|| {
            let mut m = Mqtt::connect(&path, &id)?;
            m.subscribe("bench/flood")?;
            m.r.get_ref().set_read_timeout(Some(IDLE))?;
            say("ready");
            Ok(count(|| m.next_publish().ok().map(|len| len == 0), String::new))
        })(),
        "mqtt-pub" => (|| {
            let m = std::cell::RefCell::new(Mqtt::connect(&path, "publisher")?);
            Ok(flood(
                secs,
                || m.borrow_mut().publish("bench/flood", &payload),
                || {
                    let mut m = m.borrow_mut();
                    m.publish("bench/flood", b"")?;
                    m.w.flush()
                },
            ))
        })(),
        "nats-responder" => (|| {
            let mut c = Nats::connect(&addr)?;
            c.subscribe("bench.req")?;
            say("ready");
            loop {
                c.next_msg()?;
                let reply = std::mem::take(&mut c.reply);
                c.publish(&reply, None, &payload)?;
                c.w.flush()?;
                c.reply = reply;
            }
        })(),
        "nats-requester" => (|| {
            let mut c = Nats::connect(&addr)?;
            c.subscribe("_INBOX.requester")?;
            let lat = measure(n, || {
                c.publish("bench.req", Some("_INBOX.requester"), &payload)?;
                c.w.flush()?;
                c.next_msg().map(drop)
            })?;
            say(&lat.line());
            Ok(ExitCode::SUCCESS)
        })(),
        "nats-sub" => (|| {
            let mut c = Nats::connect(&addr)?;
            c.subscribe("bench.flood")?;
            c.r.get_ref().set_read_timeout(Some(IDLE))?;
            say("ready");
            Ok(count(|| c.next_msg().ok().map(|len| len == 0), String::new))
        })(),
        "nats-pub" => (|| {
            let c = std::cell::RefCell::new(Nats::connect(&addr)?);
            Ok(flood(
                secs,
                || c.borrow_mut().publish("bench.flood", None, &payload),
                || {
                    let mut c = c.borrow_mut();
                    c.publish("bench.flood", None, b"")?;
                    c.sync()
                },
            ))
        })(),
        other => {
            say(&format!("error unknown role {other}"));
            return ExitCode::FAILURE;
        }
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            say(&format!("error {role}: {e}"));
            ExitCode::FAILURE
        }
    }
}

pub(super) fn client(path: &Path, id: &str) -> io::Result<Client> {
    let client = Client::connect(ClientConfig::new(path, id)).map_err(other)?;
    if !client.wait_connected(Duration::from_secs(5)) {
        return Err(other(format!("{id}: not connected after 5 s")));
    }
    Ok(client)
}
