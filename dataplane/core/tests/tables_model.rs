//! Reference-model test of the shared tables: random sequences of SA and
//! policy adds, updates and deletes applied incrementally to [`Tables`] and,
//! after every step, to tables rebuilt from scratch from the surviving
//! entries. Both must give the same verdicts: inbound SA lookups, outbound
//! template lookups (the newest SA winning), SPD lookups in every direction,
//! and the derived address and port sets. Seeds are printed on failure.

use espd_core::engine::{esp_addrs, local_addrs};
use espd_core::state::{
    Action, Algs, Direction, Encap, Flow, Level, Mode, Policy, Prefix, SaConfig, SaCore, SaFlags,
    Sad, Selector, Spd, Tables, Template,
};
use espd_core::wire::l4::Ports;
use std::collections::BTreeMap;
use std::net::IpAddr;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn addr(r: &mut Rng) -> IpAddr {
    // Few values in 198.18.0.0/15 so that lookups hit.
    IpAddr::V4(
        [
            198,
            18 + r.below(2) as u8,
            r.below(3) as u8,
            1 + r.below(4) as u8,
        ]
        .into(),
    )
}

fn sa_cfg(r: &mut Rng, dst: IpAddr, spi: u32) -> SaConfig {
    SaConfig {
        src: addr(r),
        dst,
        spi,
        reqid: r.below(4) as u32,
        mode: if r.below(2) == 0 {
            Mode::Tunnel
        } else {
            Mode::Transport
        },
        replay_window: 64,
        flags: SaFlags::default(),
        replay_seq: 0,
        replay_oseq: 0,
        algs: Algs::aead("rfc4106(gcm(aes))", vec![spi as u8; 20], 128),
        sel: None,
        encap: (r.below(4) == 0).then(|| Encap {
            sport: 4500,
            dport: 4500 + r.below(2) as u16,
            oa: dst,
        }),
        iv_mask: 0,
        lifetime: Default::default(),
    }
}

fn policy(r: &mut Rng) -> Policy {
    let lens = [0u8, 15, 16, 24, 32];
    let dir = Direction::ALL[r.below(3) as usize];
    let tmpl = Template {
        src: Some(addr(r)),
        dst: Some(addr(r)),
        spi: None,
        reqid: r.below(4) as u32,
        mode: Mode::Tunnel,
        level: if r.below(4) == 0 {
            Level::Use
        } else {
            Level::Required
        },
    };
    Policy {
        sel: Selector {
            src: Prefix::new(addr(r), lens[r.below(5) as usize]).unwrap(),
            dst: Prefix::new(addr(r), lens[r.below(5) as usize]).unwrap(),
            proto: [None, Some(17), Some(6)][r.below(3) as usize],
            sport: None,
            dport: None,
        },
        dir,
        priority: r.below(4) as u32,
        action: if r.below(5) == 0 {
            Action::Block
        } else {
            Action::Allow
        },
        tmpls: if r.below(3) == 0 { vec![] } else { vec![tmpl] }.into(),
    }
}

/// The model: what exists, in install order (the SAD's "newest wins").
#[derive(Default)]
struct Model {
    sas: Vec<SaConfig>,
    pols: BTreeMap<(u8, String), (u64, Policy)>,
    order: u64,
}

fn pkey(p: &Policy) -> (u8, String) {
    (p.dir as u8, format!("{:?}", p.sel))
}

impl Model {
    fn rebuild(&self, extra: &[IpAddr]) -> Tables {
        let mut sad = Sad::new();
        for c in &self.sas {
            sad.insert(SaCore::new(c.clone()).unwrap()).unwrap();
        }
        let mut spd = Spd::new();
        let mut ps: Vec<&(u64, Policy)> = self.pols.values().collect();
        ps.sort_by_key(|(o, _)| *o);
        for (_, p) in ps {
            spd.insert(p.clone()).unwrap();
        }
        Tables::new(sad, spd, extra)
    }
}

fn flow(r: &mut Rng) -> Flow {
    Flow {
        src: addr(r),
        dst: addr(r),
        proto: [17u8, 6, 1][r.below(3) as usize],
        ports: Some(Ports { sport: 1, dport: 2 }),
    }
}

fn same(inc: &Tables, reb: &Tables, r: &mut Rng, step: usize, seed: u64) {
    let ctx = format!("seed {seed:#x} step {step}");
    assert_eq!(inc.sad().len(), reb.sad().len(), "{ctx}");
    assert_eq!(inc.spd().len(), reb.spd().len(), "{ctx}");
    assert_eq!(inc.local(), reb.local(), "{ctx}: local");
    assert_eq!(inc.esp_local(), reb.esp_local(), "{ctx}: esp");
    assert_eq!(inc.encap_ports(), reb.encap_ports(), "{ctx}: ports");
    // A template without a reqid is looked up in the SAD's pair index,
    // never by a scan: kept whenever the SPD has one (the rebuilt tables
    // keep it exactly then; the incremental ones keep it once it was needed).
    let reqless = Direction::ALL.iter().any(|d| {
        reb.spd()
            .policies(*d)
            .iter()
            .any(|p| p.tmpls.iter().any(|t| t.reqid == 0))
    });
    assert_eq!(reb.sad().pair_index_kept(), reqless, "{ctx}: pair index");
    assert!(inc.sad().pair_index_kept() || !reqless, "{ctx}: pair index");
    // And the derived sets are what the from-scratch functions say.
    let l = local_addrs(reb.spd(), &[]);
    assert_eq!(inc.local(), &l[..], "{ctx}");
    assert_eq!(inc.esp_local(), &esp_addrs(reb.sad(), &l)[..], "{ctx}");
    let key = |t: &Tables, id: Option<usize>| {
        id.map(|i| (t.sad().get(i).cfg.dst, t.sad().get(i).cfg.spi))
    };
    for _ in 0..40 {
        let (d, spi) = (addr(r), 0x100 + r.below(24) as u32);
        assert_eq!(
            key(inc, inc.sad().lookup_in(d, spi)),
            key(reb, reb.sad().lookup_in(d, spi)),
            "{ctx}: lookup_in"
        );
        let f = flow(r);
        let t = Template {
            src: Some(addr(r)),
            dst: Some(addr(r)),
            spi: None,
            reqid: r.below(4) as u32,
            mode: [Mode::Tunnel, Mode::Transport][r.below(2) as usize],
            level: Level::Required,
        };
        let t = if t.mode == Mode::Transport {
            Template {
                src: None,
                dst: None,
                ..t
            }
        } else {
            t
        };
        assert_eq!(
            key(inc, inc.sad().lookup_out(&t, &f)),
            key(reb, reb.sad().lookup_out(&t, &f)),
            "{ctx}: lookup_out {t:?} {f:?}"
        );
        for dir in Direction::ALL {
            let a = inc.spd().lookup(dir, &f).map(|p| (p.sel, p.priority));
            let b = reb.spd().lookup(dir, &f).map(|p| (p.sel, p.priority));
            let c = inc
                .spd()
                .lookup_linear(dir, &f)
                .map(|p| (p.sel, p.priority));
            assert_eq!(a, b, "{ctx}: spd {dir:?} {f:?}");
            assert_eq!(a, c, "{ctx}: spd index vs scan");
        }
    }
}

#[test]
fn incremental_tables_match_a_rebuild() {
    let seeds: Vec<u64> = match std::env::var("ESPD_MODEL_SEED") {
        Ok(s) => vec![u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()],
        Err(_) => (1..=12)
            .map(|i| 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i))
            .collect(),
    };
    for seed in seeds {
        let mut r = Rng(seed | 1);
        let mut inc = Tables::default();
        let mut m = Model::default();
        for step in 0..400 {
            match r.below(6) {
                0 | 1 => {
                    let (d, spi) = (addr(&mut r), 0x100 + r.below(24) as u32);
                    let c = sa_cfg(&mut r, d, spi);
                    let exists = m.sas.iter().any(|x| (x.dst, x.spi) == (d, spi));
                    let res = inc.insert_sa(SaCore::new(c.clone()).unwrap());
                    assert_eq!(res.is_err(), exists, "seed {seed:#x} step {step}");
                    if !exists {
                        m.sas.push(c);
                    }
                }
                2 => {
                    // update: same key, new everything else (keeps its install place)
                    if let Some(i) =
                        (!m.sas.is_empty()).then(|| r.below(m.sas.len() as u64) as usize)
                    {
                        let (d, spi) = (m.sas[i].dst, m.sas[i].spi);
                        let c = sa_cfg(&mut r, d, spi);
                        inc.update_sa(SaCore::new(c.clone()).unwrap()).unwrap();
                        m.sas[i] = c;
                    }
                }
                3 => {
                    if let Some(i) =
                        (!m.sas.is_empty()).then(|| r.below(m.sas.len() as u64) as usize)
                    {
                        let c = m.sas.remove(i);
                        assert!(inc.remove_sa(c.dst, c.spi).is_some());
                    }
                }
                4 => {
                    let p = policy(&mut r);
                    let k = pkey(&p);
                    match m.pols.get(&k).map(|(o, _)| *o) {
                        Some(o) => {
                            inc.update_policy(p.clone()).unwrap();
                            m.pols.insert(k, (o, p));
                        }
                        None => {
                            inc.insert_policy(p.clone()).unwrap();
                            m.order += 1;
                            m.pols.insert(k, (m.order, p));
                        }
                    }
                }
                _ => {
                    if let Some(k) = m
                        .pols
                        .keys()
                        .nth(r.below(m.pols.len().max(1) as u64) as usize)
                        .cloned()
                    {
                        let (_, p) = m.pols.remove(&k).unwrap();
                        assert!(inc.remove_policy(p.dir, &p.sel).is_some());
                    }
                }
            }
            // The rebuild installs in model order; updates keep their place
            // there, as in the incremental tables.
            let reb = m.rebuild(&[]);
            same(&inc, &reb, &mut r, step, seed);
        }
    }
}

/// A published snapshot stays as it was while the control side changes
/// its own copy (readers never see half a change), and a removed SA's core
/// goes when the last snapshot holding it goes.
#[test]
fn snapshots_are_isolated_and_reclaimed() {
    let mut r = Rng(7);
    let mut t = Tables::default();
    let d: IpAddr = "198.18.0.1".parse().unwrap();
    t.insert_sa(SaCore::new(sa_cfg(&mut r, d, 0x200)).unwrap())
        .unwrap();
    let snap = std::sync::Arc::new(t.clone());
    let (_, core) = t.remove_sa(d, 0x200).unwrap();
    assert!(t.sad().lookup_in(d, 0x200).is_none());
    assert!(
        snap.sad().lookup_in(d, 0x200).is_some(),
        "the snapshot is unchanged"
    );
    let weak = std::sync::Arc::downgrade(&core);
    drop(core);
    assert!(weak.upgrade().is_some(), "still held by the snapshot");
    drop(snap);
    assert!(
        weak.upgrade().is_none(),
        "freed (and its keys zeroized) with the last snapshot"
    );
}
