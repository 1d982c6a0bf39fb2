//! Splits a line into words: whitespace separates, single or double quotes
//! group (as a shell would for `ip xfrm`), `#` outside quotes starts a comment.

pub fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
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
