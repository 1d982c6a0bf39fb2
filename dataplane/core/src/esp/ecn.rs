//! ECN across the tunnel, RFC 6040 (normal mode).

pub const NOT_ECT: u8 = 0b00;
pub const ECT1: u8 = 0b01;
pub const ECT0: u8 = 0b10;
pub const CE: u8 = 0b11;

/// RFC 6040 §4.1 (Figure 3), normal mode: the outer ECN field is a copy of the
/// inner one, CE included (the RFC 3168 reset of CE to ECT(0) is not needed
/// once the egress follows §4.2). Compatibility mode (`flag noecn`) writes Not-ECT.
pub fn encap(inner: u8, compat: bool) -> u8 {
    if compat {
        NOT_ECT
    } else {
        inner & 3
    }
}

/// RFC 6040 §4.2 (Figure 4): the ECN field the forwarded inner header gets,
/// or `None` when the packet must be dropped (Not-ECT inner, CE outer).
pub fn decap(inner: u8, outer: u8) -> Option<u8> {
    let (i, o) = (inner & 3, outer & 3);
    match (i, o) {
        (NOT_ECT, CE) => None,
        (NOT_ECT, _) => Some(NOT_ECT),
        (CE, _) => Some(CE),
        (_, CE) => Some(CE),
        (ECT0, ECT1) => Some(ECT1),
        (ECT1, _) => Some(ECT1),
        (ECT0, _) => Some(ECT0),
        _ => Some(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6040_figure_4() {
        // Rows: arriving inner; columns: arriving outer Not-ECT, ECT(0), ECT(1), CE.
        let table = [
            (NOT_ECT, [Some(NOT_ECT), Some(NOT_ECT), Some(NOT_ECT), None]),
            (ECT0, [Some(ECT0), Some(ECT0), Some(ECT1), Some(CE)]),
            (ECT1, [Some(ECT1), Some(ECT1), Some(ECT1), Some(CE)]),
            (CE, [Some(CE), Some(CE), Some(CE), Some(CE)]),
        ];
        for (inner, row) in table {
            for (outer, want) in [NOT_ECT, ECT0, ECT1, CE].into_iter().zip(row) {
                assert_eq!(decap(inner, outer), want, "inner {inner} outer {outer}");
            }
        }
    }

    #[test]
    fn encap_normal_mode() {
        for e in [NOT_ECT, ECT0, ECT1, CE] {
            assert_eq!(encap(e, false), e);
            assert_eq!(encap(e, true), NOT_ECT);
        }
    }
}
