//! Word splitting with quotes, and `$VAR` / `${VAR}` expansion, as Dockerfiles use them in
//! `ENV`, `COPY`, `WORKDIR` and `USER`.

use std::collections::BTreeMap;

/// Splits `text` at unquoted whitespace; `"…"` and `'…'` group words and are removed, `\`
/// escapes the next character outside single quotes.
pub(crate) fn split(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => word.push(c),
            (_, '\\') => {
                in_word = true;
                // A backslash before `$` is kept so that expansion sees the escape.
                match chars.next() {
                    Some('$') => word.push_str("\\$"),
                    Some(next) => word.push(next),
                    None => word.push('\\'),
                }
            }
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The longest text an expansion may produce: the longest string Linux passes to a process
/// (`MAX_ARG_STRLEN`, 128 KiB). Without a bound, `ENV A=$A$A` repeated doubles a value per line.
pub const MAX_EXPANDED: usize = 128 << 10;

/// Replaces `$NAME` and `${NAME}` with values from `env` (unset names become empty);
/// `${NAME:-default}` uses `default` when unset or empty; `\$` is a literal `$`. Fails when the
/// result would exceed [`MAX_EXPANDED`] bytes.
pub fn expand(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len().min(MAX_EXPANDED));
    let mut rest = text;
    while let Some(pos) = rest.find(['$', '\\']) {
        if out.len() > MAX_EXPANDED {
            break;
        }
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("\\$") {
            out.push('$');
            rest = after;
            continue;
        }
        if let Some(after) = tail.strip_prefix('\\') {
            out.push('\\');
            rest = after;
            continue;
        }
        let after = &tail[1..];
        if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in '{text}'"))?;
            let inner = &braced[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("'${{{inner}}}' is not a variable reference this spec supports"));
            }
            let value = env.get(name).filter(|v| !(default.is_some() && v.is_empty()));
            out.push_str(value.map(String::as_str).or(default).unwrap_or_default());
            rest = &braced[end + 1..];
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(env.get(&after[..len]).map(String::as_str).unwrap_or_default());
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    if out.len() > MAX_EXPANDED {
        return Err(format!("expands to more than {MAX_EXPANDED} bytes"));
    }
    Ok(out)
}
