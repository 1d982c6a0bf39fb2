//! Outbound: the SPD decision for a flow (RFC 4301 §5.1), the SAs of a
//! bundle applied in order, TTL, MTU (§8.2.1) and NAT keepalives (RFC 3948 §4).

use super::*;

/// SA ids one [`Engine::nat_keepalives`] call looks at.
pub const KEEPALIVE_SWEEP: usize = 2048;

/// RFC 1812 §5.3.1 / RFC 8200 §3: a forwarded packet's TTL / hop limit goes
/// down by one; one that would reach 0 is not forwarded. The IPv4 header
/// checksum is updated incrementally (RFC 1624 eqn. 3).
pub(super) fn decrement_ttl(ip: &mut [u8], l3: &L3) -> Result<(), DropReason> {
    let at = if l3.version == 4 { 8 } else { 7 };
    let Some(&ttl) = ip.get(at) else {
        return Err(DropReason::Runt);
    };
    if ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    ip[at] = ttl - 1;
    if l3.version == 4 {
        // HC' = ~(~HC + ~m + m'), m = the TTL/protocol word.
        let old = u16::from_be_bytes([ttl, ip[9]]);
        let new = u16::from_be_bytes([ttl - 1, ip[9]]);
        let hc = u16::from_be_bytes([ip[10], ip[11]]);
        let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    Ok(())
}

impl Engine {
    /// RFC 3948 §4: for every outbound UDP-encapsulated SA that has sent
    /// nothing for `idle` seconds, builds a NAT keepalive (one 0xFF octet from
    /// the SA's source port to its destination port) into `buf` and hands it
    /// to `emit`. Call it about once a second.
    pub fn nat_keepalives(&mut self, idle: u64, buf: &mut [u8], mut emit: impl FnMut(&[u8])) {
        let now = self.now;
        let bound = self.tables.sad().id_bound();
        // A bounded sweep that goes on where the last one stopped: with
        // calls ten times a second, 100 000 SAs are all visited within the
        // 20 s a keepalive interval lasts, and no call stalls the worker.
        for _ in 0..bound.min(KEEPALIVE_SWEEP) {
            let id = self.keepalive_at % bound;
            self.keepalive_at = id + 1;
            let Some(core) = self.tables.sad().core(id) else {
                continue;
            };
            let Some(e) = core.cfg.encap else { continue };
            let (src, dst) = (core.cfg.src, core.cfg.dst);
            if !self.is_local(src) {
                continue;
            }
            let sa = self.run(id);
            if sa.last_tx == 0 {
                // First sight: start the idle timer now.
                sa.last_tx = now;
                continue;
            }
            if now.saturating_sub(sa.last_tx) < idle {
                continue;
            }
            sa.last_tx = now;
            if let Some(n) =
                wire::udp::nat_keepalive(buf, src, dst, e.sport, e.dport, esp_out::OUTER_TTL)
            {
                emit(&buf[..n]);
            }
        }
    }

    pub(super) fn outbound(&mut self, pkt: &mut PacketBuf<'_>, l3: &L3, flow: &Flow) -> Verdict {
        let (b, n) = (&self.burst, self.tables_version());
        // A forwarded packet's decision differs (no inbound check): not cached.
        let cache = b.active && !self.forwarded;
        let decision = match b.out.get(n, flow).filter(|_| cache) {
            Some(d) => d,
            None => {
                let d = self.out_decision(flow);
                if cache {
                    self.burst.out.put(n, flow, d);
                }
                d
            }
        };
        let (chain, k) = match decision {
            OutDecision::Done(v @ Verdict::Drop(DropReason::NoOutSa)) => {
                self.acquire(flow);
                return v;
            }
            OutDecision::Done(v) => return v,
            OutDecision::Forward => return self.forward_bypass(pkt, l3, flow),
            OutDecision::Protect(chain, k) => (chain, usize::from(k)),
        };
        let chain = &chain[..k];
        // The owner of the first SA encapsulates, so that its packets leave
        // in sequence-number order; the first worker to send claims it.
        if let Some(s) = self.shared.then(|| &self.core(chain[0]).share) {
            // A plain load first: the owner's own packets need no atomic write.
            let owner = s.owner.load(Relaxed);
            let claim = if owner == SaShare::NO_OWNER {
                s.owner
                    .compare_exchange(SaShare::NO_OWNER, self.worker, Relaxed, Relaxed)
            } else {
                Err(owner)
            };
            match claim {
                Ok(_) => {}
                Err(w) if w == self.worker => {}
                Err(w) => return Verdict::Handoff(w),
            }
        }
        // A forwarded (hairpinned) packet's hop was counted when it was
        // decapsulated: one gateway, one decrement.
        if self.router && !self.forwarded {
            if let Err(r) = decrement_ttl(pkt.data_mut(), l3) {
                return self.icmp_error(pkt, l3, flow, IcmpKind::TimeExceeded, r);
            }
        }
        if let Some(mtu) = self.mtu {
            if let Some(v) = self.check_mtu(pkt, l3, flow, chain, mtu) {
                return v;
            }
        }
        // RFC 6437: only an IPv6 tunnel header carries the flow label.
        let v6_tunnel = chain.iter().any(|&id| {
            let c = &self.core(id).cfg;
            c.mode == Mode::Tunnel && c.dst.is_ipv6()
        });
        let mut params = OutParams {
            flow_label: if v6_tunnel { flow_label(flow) } else { 0 },
            reserve: 1,
        };
        let mut l3 = *l3;
        for &id in chain {
            if !self.within_lifetime(id) {
                // An SA that ran out of sequence numbers keeps saying so.
                let sa = self.run(id);
                let r = if sa.exhausted {
                    DropReason::SeqCycled
                } else {
                    DropReason::SaExpired
                };
                sa.count_drop(r);
                return Verdict::Drop(r);
            }
        }
        for (i, &id) in chain.iter().enumerate() {
            let b = &mut self.burst;
            let sa = self.runs.get(&self.tables, id, self.shared);
            sa.last_tx = self.now;
            // Reserve the burst's numbers only where end_burst will find them.
            let listed = b.reserved[..b.n_reserved].contains(&id);
            params.reserve = if b.active && (listed || b.n_reserved < MAX_RESERVED) {
                b.left.max(1)
            } else {
                1
            };
            let r = esp_out::encapsulate(sa, pkt, &l3, &params);
            if sa.seq_block.is_some() && !listed {
                if let Some(slot) = b.reserved.get_mut(b.n_reserved) {
                    *slot = id;
                    b.n_reserved += 1;
                }
            }
            if let Err(r) = r {
                sa.count_drop(r);
                if r == DropReason::SeqCycled && !sa.expired {
                    // The end of the sequence space acts as a hard expiry.
                    sa.expired = true;
                    let (dst, spi) = (sa.core.cfg.dst, sa.core.cfg.spi);
                    self.event(SaEventKind::HardExpire, dst, spi, "sequence");
                }
                return Verdict::Drop(r);
            }
            // Only a further layer needs the new header's facts.
            if i + 1 < chain.len() {
                match parse_ro(pkt.data()) {
                    Ok((next, _)) => l3 = next,
                    Err(r) => return Verdict::Drop(r),
                }
            }
        }
        Verdict::Encapsulated(chain[0])
    }

    /// The SPD and SAD part of outbound processing for `flow`.
    pub(super) fn out_decision(&self, flow: &Flow) -> OutDecision {
        use OutDecision::{Done, Forward, Protect};
        // Inbound check on plaintext (RFC 4301 §5.2 step 3a): a packet that a
        // policy says must arrive protected is dropped when it arrives in clear.
        let local = self.is_local(flow.dst);
        let dir = if local { Direction::In } else { Direction::Fwd };
        match self
            .tables
            .spd()
            .lookup(dir, flow)
            .filter(|_| !self.forwarded)
        {
            Some(p) if p.action == Action::Block => {
                return Done(Verdict::Drop(DropReason::Discard))
            }
            Some(p) if p.requires_protection() => {
                return Done(Verdict::Drop(DropReason::UnprotectedInbound))
            }
            Some(_) => {}
            None if !self.forwarded && self.tables.spd().default_action(dir) == Action::Block => {
                return Done(Verdict::Drop(DropReason::NoPolicy))
            }
            None => {}
        }
        if local {
            // Addressed to this host and allowed: delivered, not forwarded.
            return Done(Verdict::Bypass);
        }
        let Some(p) = self.tables.spd().lookup(Direction::Out, flow) else {
            return match self.tables.spd().default_action(Direction::Out) {
                Action::Allow => Forward,
                Action::Block => Done(Verdict::Drop(DropReason::NoPolicy)),
            };
        };
        if p.action == Action::Block {
            return Done(Verdict::Drop(DropReason::Discard));
        }
        // An SA bundle applies its templates in order: the first innermost
        // (XFRM), e.g. transport end to end, then the tunnel to the gateway.
        // Resolve the whole chain before touching the packet.
        let mut chain = [0 as SaId; MAX_NEST];
        let mut k = 0;
        for t in p.tmpls.iter().take(MAX_NEST) {
            match self.tables.sad().lookup_out(t, flow) {
                Some(id) => {
                    chain[k] = id;
                    k += 1;
                }
                None if t.level == Level::Use => {}
                None => return Done(Verdict::Drop(DropReason::NoOutSa)),
            }
        }
        if k == 0 {
            return Forward;
        }
        Protect(chain, k as u8)
    }

    /// BYPASS of a packet that is not for this host: forwarded in clear,
    /// one hop less in router mode.
    pub(super) fn forward_bypass(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        l3: &L3,
        flow: &Flow,
    ) -> Verdict {
        if self.router && !self.forwarded {
            if let Err(r) = decrement_ttl(pkt.data_mut(), l3) {
                return self.icmp_error(pkt, l3, flow, IcmpKind::TimeExceeded, r);
            }
        }
        Verdict::Bypass
    }

    /// RFC 4301 §8.2.1 / §8.1: `None` to go on and encapsulate (it fits, or
    /// the outer packet may be fragmented by the caller), or the verdict for a
    /// packet that is too big and may not be fragmented.
    pub(super) fn check_mtu(
        &mut self,
        pkt: &mut PacketBuf<'_>,
        l3: &L3,
        flow: &Flow,
        chain: &[SaId],
        mtu: usize,
    ) -> Option<Verdict> {
        let keep = if l3.version == 4 {
            l3.upper_at
        } else {
            l3.esp_at
        };
        let mut len = pkt.len();
        let mut keep_now = keep;
        for &id in chain {
            len = esp_out::encapsulated_len(self.core(id), len, keep_now);
            keep_now = 0;
        }
        if len <= mtu {
            return None;
        }
        // The largest inner packet that fits, from the outermost SA inwards.
        let mut fit = mtu;
        for (i, &id) in chain.iter().enumerate().rev() {
            fit = esp_out::max_inner(self.core(id), fit, if i == 0 { keep } else { 0 });
        }
        // IPv4 without DF: encapsulate; the outer packet will be fragmented.
        // IPv6 of at most 1280 octets must get through whatever the tunnel's
        // MTU (RFC 8200 §5): fragment the outer packet for it too.
        // This host's own datagram (reassembled from its stack's fragments):
        // fragmented after IPsec, as its stack would have (RFC 4301 §7).
        let may_fragment = (l3.version == 4 && !l3.df)
            || (l3.version == 6 && pkt.len() <= 1280)
            || self.own_datagram;
        if may_fragment {
            return None;
        }
        Some(self.icmp_error(
            pkt,
            l3,
            flow,
            IcmpKind::TooBig(fit),
            DropReason::PacketTooBig,
        ))
    }
}
