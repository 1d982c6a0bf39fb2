//! `espctl check FILE`: 0 and a summary for a good file; 1 and every error as
//! FILE:LINE: reason for a bad one, with no key material in the output.

use std::process::Command;

fn check(text: &str) -> (i32, String, String) {
    let p = std::env::temp_dir().join(format!("espctl-{}-{}.conf", std::process::id(), text.len()));
    std::fs::write(&p, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_espctl"))
        .arg("check")
        .arg(&p)
        .output()
        .unwrap();
    std::fs::remove_file(&p).ok();
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

const KEY: &str = "0x5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7";

#[test]
fn good_file() {
    let (code, out, _) = check(&format!(
        "# comment\nstate add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 mode tunnel aead 'rfc4106(gcm(aes))' {KEY} 128\n"
    ));
    assert_eq!(code, 0);
    assert!(out.ends_with(": ok: 1 states, 0 policies\n"), "{out}");
    assert!(!out.contains("5ec7e7"));
}

#[test]
fn bad_file_lists_every_error() {
    let (code, out, err) = check(&format!(
        "state add src 198.18.0.1 dst 198.18.0.2 proto esp spi 0x1000 aead 'rfc4106(gcm(aes))' {KEY} 120\n\
         \n\
         policy add src 198.18.1.0/24 dst 198.18.2.0/24 dir out tmpl proto esp mode tunnel\n"
    ));
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].contains(".conf:1: rfc4106(gcm(aes)): ICV length must be 64, 96 or 128 bits"),
        "{err}"
    );
    assert!(
        lines[1].contains(".conf:3: a tunnel-mode `tmpl` needs `src ADDR dst ADDR`"),
        "{err}"
    );
    assert!(!err.contains("5ec7e7"), "key echoed");
}
