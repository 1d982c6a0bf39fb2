//! Splits a line into words: whitespace separates, single or double quotes
//! group (as a shell would for `ip xfrm`), `#` outside quotes starts a comment.
//!
//! A word without quotes is a slice of the line: no copy is made, so a key
//! written in hex is not left behind in freed memory, and a batch of
//! thousands of lines costs one vector a line, not one string a word. A word
//! with quotes is built once at its final capacity (no reallocation leaves a
//! partial copy behind) and zeroized when the [`Words`] go.

use std::borrow::Cow;
use std::ops::Deref;
use zeroize::Zeroize;

/// The words of one line (see the module doc).
#[derive(Debug, Default)]
pub struct Words<'a>(Vec<Cow<'a, str>>);

impl<'a> Deref for Words<'a> {
    type Target = [Cow<'a, str>];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Words<'_> {
    fn drop(&mut self) {
        for w in &mut self.0 {
            if let Cow::Owned(s) = w {
                s.zeroize();
            }
        }
    }
}

impl Words<'_> {
    /// The words as string slices, for the parser.
    pub fn strs(&self) -> Vec<&str> {
        self.0.iter().map(|w| w.as_ref()).collect()
    }
}

pub fn words(line: &str) -> Result<Words<'_>, String> {
    let mut out = Words::default();
    // Where the word being read starts, and its text once a quote made it
    // differ from the line's.
    let mut start: Option<usize> = None;
    let mut owned: Option<String> = None;
    let mut quote: Option<char> = None;
    let mut end = line.len();
    let finish = |s: usize, e: usize, o: Option<String>| match o {
        Some(o) => Cow::Owned(o),
        None => Cow::Borrowed(&line[s..e]),
    };
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {
                if let Some(o) = owned.as_mut() {
                    o.push(c);
                }
            }
            None => match c {
                '#' => {
                    end = i;
                    break;
                }
                '\'' | '"' => {
                    let s = *start.get_or_insert(i);
                    if owned.is_none() {
                        let mut o = String::with_capacity(line.len() - s);
                        o.push_str(&line[s..i]);
                        owned = Some(o);
                    }
                    quote = Some(c);
                }
                c if c.is_whitespace() => {
                    if let Some(s) = start.take() {
                        out.0.push(finish(s, i, owned.take()));
                    }
                }
                c => {
                    start.get_or_insert(i);
                    if let Some(o) = owned.as_mut() {
                        o.push(c);
                    }
                }
            },
        }
    }
    if let Some(q) = quote {
        if let Some(mut o) = owned {
            o.zeroize();
        }
        return Err(format!("unterminated {q}-quoted word"));
    }
    if let Some(s) = start {
        out.0.push(finish(s, end, owned));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(line: &str) -> Vec<String> {
        words(line).unwrap().iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn words_quotes_and_comments() {
        assert_eq!(w(""), Vec::<String>::new());
        assert_eq!(w("  a  b\tc "), ["a", "b", "c"]);
        assert_eq!(
            w("aead 'rfc4106(gcm(aes))' 0x01 128"),
            ["aead", "rfc4106(gcm(aes))", "0x01", "128"]
        );
        assert_eq!(w("a'b c'd e"), ["ab cd", "e"]);
        assert_eq!(w("say \"it's\" ''"), ["say", "it's", ""]);
        assert_eq!(w("a#b c"), ["a"]);
        assert_eq!(w("a '#' # c"), ["a", "#"]);
        assert_eq!(w("é ü'ß'"), ["é", "üß"]);
        assert_eq!(words("a 'b").unwrap_err(), "unterminated '-quoted word");
    }

    /// The lexer as it was before words became slices: one string a word.
    fn reference(line: &str) -> Result<Vec<String>, String> {
        let (mut out, mut cur, mut in_word, mut quote) = (Vec::new(), String::new(), false, None);
        for c in line.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => cur.push(c),
                None => match c {
                    '#' => break,
                    '\'' | '"' => {
                        quote = Some(c);
                        in_word = true;
                    }
                    c if c.is_whitespace() => {
                        if in_word {
                            out.push(std::mem::take(&mut cur));
                            in_word = false;
                        }
                    }
                    c => {
                        cur.push(c);
                        in_word = true;
                    }
                },
            }
        }
        if let Some(q) = quote {
            return Err(format!("unterminated {q}-quoted word"));
        }
        if in_word {
            out.push(cur);
        }
        Ok(out)
    }

    #[test]
    fn the_same_words_as_the_reference_on_random_lines() {
        let alphabet: Vec<char> = "ab0 \t'\"#(é".chars().collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for case in 0..50_000 {
            let mut line = String::new();
            for _ in 0..(case % 24) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                line.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let got = words(&line).map(|w| w.iter().map(|w| w.to_string()).collect::<Vec<_>>());
            assert_eq!(got, reference(&line), "{line:?}");
        }
    }

    #[test]
    fn unquoted_words_are_slices_of_the_line() {
        let line = "state add spi 0x1 enc 'cbc(aes)' 0x0123456789abcdef";
        let ws = words(line).unwrap();
        for x in ws.iter() {
            match x {
                Cow::Borrowed(b) => assert!(line.contains(b)),
                Cow::Owned(o) => assert_eq!(o, "cbc(aes)"),
            }
        }
        assert!(matches!(ws[6], Cow::Borrowed("0x0123456789abcdef")));
    }
}
