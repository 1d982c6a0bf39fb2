//! Inbound: ESP (raw or UDP-encapsulated, RFC 3948) for one of our addresses,
//! decapsulated layer by layer, and the policy check on what came out
//! (RFC 4301 §5.2); unprotected traffic that must not be accepted.

use super::*;

/// Why one layer of ESP was not removed.
pub(super) enum DecapErr {
    /// Another worker owns the SA (the packet is untouched).
    Owned(u32),
    Failed(DropReason),
}

use DecapErr::{Failed, Owned};

/// XFRM's `xfrm_policy_ok` walk: templates from the last (outermost) to the
/// first against the SA path from the outermost; a `level use` template may be
/// missing; SAs left over must be transport mode (`secpath_has_nontransport`).
pub(super) fn templates_match(tmpls: &[Template], path: &[Option<&SaConfig>]) -> bool {
    let mut k = 0;
    for t in tmpls.iter().rev() {
        if let Some(Some(c)) = path.get(k) {
            if t.accepts(c.mode, c.reqid, c.spi, c.src, c.dst) {
                k += 1;
                continue;
            }
        }
        if t.level != Level::Use {
            return false;
        }
    }
    path[k..]
        .iter()
        .flatten()
        .all(|c| c.mode == Mode::Transport)
}

impl Engine {
    /// RFC 4301 §6.1.1: an ICMP error that arrives unprotected while the
    /// packet it quotes belongs to a flow the SPD protects is not accepted —
    /// otherwise anyone on the wire could reset or redirect protected flows.
    /// An error that is itself selected for protection (a host behind us
    /// answering a peer) goes on through the normal path. Checked per packet,
    /// not through the flow cache: two errors with one outer 5-tuple may
    /// quote different packets.
    pub(super) fn icmp_error_about_protected(&self, d: &[u8], l3: &L3, flow: &Flow) -> bool {
        if l3.fragment
            || self
                .tables
                .spd()
                .lookup(Direction::Out, flow)
                .is_some_and(|p| p.requires_protection())
        {
            return false;
        }
        let Some((src, dst, proto, ports)) = d.get(l3.upper_at..).and_then(l4::quoted) else {
            return false;
        };
        if src.is_ipv4() != flow.src.is_ipv4() || dst.is_ipv4() != flow.dst.is_ipv4() {
            return false;
        }
        let q = Flow {
            src,
            dst,
            proto,
            ports,
        };
        // The quoted packet went out from behind us (out policy), or came in
        // to us or our hosts (in/fwd policy): either way, protected traffic.
        [Direction::Out, Direction::Fwd, Direction::In]
            .iter()
            .any(|dir| {
                self.tables
                    .spd()
                    .lookup(*dir, &q)
                    .is_some_and(|p| p.requires_protection())
            })
    }

    /// ESP (raw, or behind an encapsulation port's UDP header) not addressed
    /// to us whose destination and SPI are one of our SAs': a copy of our own
    /// outbound traffic that came back (reflected, looped, or the other
    /// direction of a capture). Dropped before any crypto.
    pub(super) fn is_own_esp(&self, d: &[u8], l3: &L3, encap: bool, dst: IpAddr) -> bool {
        if l3.fragment {
            return false;
        }
        let at = l3.upper_at + if encap { wire::udp::HEADER_LEN } else { 0 };
        let Some(spi) = d
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return false;
        };
        spi != 0
            && self
                .tables
                .sad()
                .lookup_in(dst, spi)
                .is_some_and(|id| self.tables.sad().get(id).cfg.encap.is_some() == encap)
    }

    pub(super) fn inbound(&mut self, pkt: &mut PacketBuf<'_>, l3: &L3, dst: IpAddr) -> Verdict {
        // The SAs this packet came through, outermost first (XFRM's secpath):
        // a tunnel may carry ESP for this host again (an SA bundle).
        let mut sp = [0 as SaId; MAX_NEST];
        let mut n = 0;
        let (mut l3, mut dst) = (*l3, dst);
        loop {
            let id = match self.decap_one(pkt, &l3, dst) {
                Ok((id, Decap::Packet)) => id,
                Ok((id, Decap::Dummy)) => return Verdict::Dummy(id),
                Err(Owned(w)) if n == 0 => return Verdict::Handoff(w),
                Err(Owned(_)) => return self.drop_for(&sp[..n], DropReason::ForeignQueue),
                Err(Failed(r)) => return Verdict::Drop(r),
            };
            sp[n] = id;
            n += 1;
            let Ok((inner, flow)) = parse_ro(pkt.data()) else {
                return self.drop_for(&sp[..n], DropReason::BadInner);
            };
            let nested = inner.proto == proto::ESP && self.opens_esp_to(flow.dst);
            if !nested {
                // The inner packet is parsed once; the policy check uses this flow.
                return match self.check_decapsulated_cached(&flow, &sp[..n]) {
                    Ok(()) if self.router && !self.is_local(flow.dst) => {
                        match decrement_ttl(pkt.data_mut(), &inner) {
                            Ok(()) => Verdict::Decapsulated(sp[0]),
                            Err(r) => self.drop_for(&sp[..n], r),
                        }
                    }
                    Ok(()) => Verdict::Decapsulated(sp[0]),
                    Err(r) => self.drop_for(&sp[..n], r),
                };
            }
            if n == MAX_NEST {
                return self.drop_for(&sp[..n], DropReason::BadInner);
            }
            (l3, dst) = (inner, flow.dst);
        }
    }

    /// RFC 3948 §2: on an encapsulation port, a lone 0xFF is a NAT keepalive,
    /// a zero non-ESP marker starts an IKE message (for the IKE daemon, never
    /// decrypted), anything else is ESP. The UDP checksum is not checked
    /// (§3.1.2: any value is accepted).
    pub(super) fn udp_encapsulated(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        l3: &L3,
        dst: IpAddr,
    ) -> Verdict {
        if l3.fragment {
            return Verdict::Drop(DropReason::Fragment);
        }
        let d = pkt.data();
        let Ok(u) = wire::udp::Packet::new_checked(&d[l3.upper_at..]) else {
            return Verdict::Drop(DropReason::Runt);
        };
        let payload = u.payload();
        if payload == [0xff] {
            return Verdict::Keepalive;
        }
        if payload.len() >= 4 && payload[..4] == [0, 0, 0, 0] {
            self.counters.ike += 1;
            return Verdict::Bypass;
        }
        if payload.len() < wire::esp::HEADER_LEN {
            return Verdict::Drop(DropReason::Runt);
        }
        // Trailing octets past the UDP length are not part of the ESP packet.
        let end = l3.upper_at + usize::from(u.len());
        pkt.truncate(end);
        let esp_l3 = L3 {
            ip: wire::ip::Repr {
                upper_at: l3.upper_at + wire::udp::HEADER_LEN,
                ..l3.ip
            },
            udp_encap: true,
        };
        self.inbound(pkt, &esp_l3, dst)
    }

    /// Counts `r` against the innermost SA of the path and drops.
    pub(super) fn drop_for(&mut self, sp: &[SaId], r: DropReason) -> Verdict {
        if let Some(&id) = sp.last() {
            self.run(id).count_drop(r);
        }
        Verdict::Drop(r)
    }

    /// One layer of ESP: the SA, and the inner packet in `pkt` or a dummy
    /// packet (RFC 4303 §2.6).
    pub(super) fn decap_one(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        l3: &L3,
        dst: IpAddr,
    ) -> Result<(SaId, Decap), DecapErr> {
        if l3.fragment {
            // RFC 4303 §3.4.1: reassembly happens before ESP; we do not reassemble.
            return Err(Failed(DropReason::Fragment));
        }
        let d = pkt.data();
        let esp = wire::esp::Packet::new_checked(&d[l3.upper_at..])
            .map_err(|_| Failed(DropReason::Runt))?;
        let spi = esp.spi();
        if spi == 0 {
            return Err(Failed(DropReason::SpiZero));
        }
        let cached = match self.burst.sa_in {
            Some((d, s, id)) if s == spi && d == dst => Some(id),
            _ => None,
        };
        let Some(id) = cached.or_else(|| self.tables.sad().lookup_in(dst, spi)) else {
            if self.unknown_spi_second != Some(self.now) {
                self.unknown_spi_second = Some(self.now);
                self.event(SaEventKind::UnknownSpi, dst, spi, "");
            }
            return Err(Failed(DropReason::NoSa));
        };
        if self.burst.active {
            self.burst.sa_in = Some((dst, spi, id));
        }
        let worker = self.worker;
        let sa = self.run(id);
        if sa.core.cfg.encap.is_some() != l3.udp_encap {
            sa.count_drop(DropReason::EncapMismatch);
            return Err(Failed(DropReason::EncapMismatch));
        }
        // One replay window per SA (RFC 4303 §3.4.3): with several workers,
        // the owner's. No crypto is spent here on another worker's packets.
        if let Some(w) = sa.share.as_ref().map(|s| s.owner.load(Relaxed)) {
            if w != SaShare::NO_OWNER && w != worker {
                return Err(Owned(w));
            }
        }
        if !self.within_lifetime(id) {
            self.run(id).count_drop(DropReason::SaExpired);
            return Err(Failed(DropReason::SaExpired));
        }
        let sa = self.run(id);
        let r = esp_in::decapsulate(sa, pkt, l3);
        let r = match (r, sa.share.as_ref()) {
            // Claimed only after the ICV verified, so forged packets on
            // another queue cannot take a tunnel away from its worker.
            (Ok(d), Some(s)) if s.owner.load(Relaxed) == worker => Ok(d),
            (Ok(d), Some(s)) => {
                match s
                    .owner
                    .compare_exchange(SaShare::NO_OWNER, worker, Relaxed, Relaxed)
                {
                    Ok(_) => Ok(d),
                    Err(o) if o == worker => Ok(d),
                    // Another worker claimed it at the same moment: this packet
                    // is already decrypted and cannot be handed over.
                    Err(_) => Err(DropReason::ForeignQueue),
                }
            }
            (r, _) => r,
        };
        match r {
            Err(r) => {
                sa.count_drop(r);
                Err(Failed(r))
            }
            Ok(d) => Ok((id, d)),
        }
    }

    /// [`Engine::check_decapsulated`], answered from the flow cache when this
    /// inner flow came through the same SA path before (in a burst only).
    pub(super) fn check_decapsulated_cached(
        &mut self,
        flow: &Flow,
        sp: &[SaId],
    ) -> Result<(), DropReason> {
        let n = self.tables_version();
        if let Some((p, k)) = self
            .burst
            .checked
            .get(n, flow)
            .filter(|_| self.burst.active)
        {
            if p[..k] == *sp {
                return Ok(());
            }
        }
        let r = self.check_decapsulated(flow, sp);
        if r.is_ok() && self.burst.active {
            let mut p = [0 as SaId; MAX_NEST];
            p[..sp.len()].copy_from_slice(sp);
            self.burst.checked.put(n, flow, (p, sp.len()));
        }
        r
    }

    /// RFC 4301 §5.2 step 4 and Linux `__xfrm_policy_check`: what came out of
    /// the SAs `sp` (outermost first) must match every SA's selector and an
    /// in/fwd policy whose templates, read from the last, name those SAs.
    pub(super) fn check_decapsulated(&self, flow: &Flow, sp: &[SaId]) -> Result<(), DropReason> {
        let mut path = [None; MAX_NEST];
        for (slot, &id) in path.iter_mut().zip(sp) {
            let c = &self.core(id).cfg;
            if c.sel.as_ref().is_some_and(|sel| !sel.matches(flow)) {
                return Err(DropReason::PolicyMismatch);
            }
            *slot = Some(c);
        }
        let path = &path[..sp.len()];
        let all_transport = path.iter().flatten().all(|c| c.mode == Mode::Transport);
        // A transport-mode SA ends at this host (RFC 4301 §4.1), so what it
        // carries is checked against `in`; tunnel-mode traffic against `in` or
        // `fwd` by its inner destination.
        let innermost = path.last().copied().flatten().map(|c| c.mode);
        let dir = if innermost == Some(Mode::Transport) || self.is_local(flow.dst) {
            Direction::In
        } else {
            Direction::Fwd
        };
        match self.tables.spd().lookup(dir, flow) {
            Some(p) if p.action == Action::Block => Err(DropReason::Discard),
            Some(p) if templates_match(&p.tmpls, path) => Ok(()),
            Some(_) => Err(DropReason::PolicyMismatch),
            // No policy: transport-mode traffic is accepted when the default
            // allows; tunnel-mode traffic never is (XFRM's XfrmInNoPols).
            None if all_transport && self.tables.spd().default_action(dir) == Action::Allow => {
                Ok(())
            }
            None => Err(DropReason::NoPolicy),
        }
    }
}
