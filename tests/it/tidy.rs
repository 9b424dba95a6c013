//! House rules, checked on the files themselves so they hold without a browser: the page's
//! scripts use no HTML sinks, its HTML needs no exception to the Content-Security-Policy the
//! server sends, its templates carry their placeholders; every Rust file starts with a `//!`
//! doc comment, and none holds a `dbg!` or an ignored test.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::{get, start_default, HttpResponse};

/// The repository root (this crate's manifest directory).
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every file under `dir` (relative to [`ROOT`], searched recursively) whose name ends with
/// `.{extension}`, with its text, sorted by path.
fn files(dir: &str, extension: &str) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, extension: &str, found: &mut Vec<(PathBuf, String)>) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("read the folder {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                walk(&path, extension, found);
            } else if path.extension().is_some_and(|e| e == extension) {
                let text = fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                found.push((path, text));
            }
        }
    }
    let mut found = Vec::new();
    walk(&Path::new(ROOT).join(dir), extension, &mut found);
    found.sort();
    assert!(!found.is_empty(), "no .{extension} file under {dir}/");
    found
}

/// Every `.rs` file of the server, its tests and the benchmark tool.
fn rust_files() -> Vec<(PathBuf, String)> {
    ["src", "tests", "bench/src"]
        .into_iter()
        .flat_map(|dir| files(dir, "rs"))
        .collect()
}

/// `path:line` of every place in `text` where `needle` starts a word (no identifier character
/// right before it, so `eval(` does not match `retrieval(`).
fn places(path: &Path, text: &str, needle: &str) -> Vec<String> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    text.match_indices(needle)
        .filter(|(at, _)| !text[..*at].chars().next_back().is_some_and(is_ident))
        .map(|(at, _)| {
            let line = text[..at].matches('\n').count() + 1;
            let relative = path.strip_prefix(ROOT).unwrap_or(path);
            format!("{}:{line}", relative.display())
        })
        .collect()
}

/// Asserts that no file has any of `needles`, listing every place that does.
fn assert_none_of(files: &[(PathBuf, String)], needles: &[&str], rule: &str) {
    let found: Vec<String> = files
        .iter()
        .flat_map(|(path, text)| {
            needles.iter().flat_map(move |needle| {
                places(path, text, needle)
                    .into_iter()
                    .map(move |place| format!("{place}: {needle}"))
            })
        })
        .collect();
    assert!(found.is_empty(), "{rule}:\n{}", found.join("\n"));
}

#[test]
fn the_word_search_finds_words_and_their_lines() {
    let path = Path::new(ROOT).join("static/x.js");
    let text = "let a = retrieval(1);\nel.innerHTML = x; eval(y)\n  eval(z)";
    assert_eq!(
        places(&path, text, "eval("),
        ["static/x.js:2", "static/x.js:3"]
    );
    assert_eq!(places(&path, text, "innerHTML"), ["static/x.js:2"]);
}

#[test]
fn scripts_use_no_html_sinks() {
    // Received text goes in with textContent and createTextNode, never parsed as HTML; and
    // nothing the CSP (script-src 'self') would refuse to run.
    assert_none_of(
        &files("static", "js"),
        &[
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ],
        "HTML sinks or eval in the page's scripts",
    );
}

/// One HTML start tag: its lowercased name, its attributes (lowercased names, raw values) and
/// the text up to the next tag.
#[derive(Debug)]
struct Tag {
    name: String,
    attributes: Vec<(String, String)>,
    text_after: String,
}

/// The start tags of an HTML document, in order; comments, the doctype and end tags are
/// skipped. Enough for the hand-written pages in static/, not a general HTML parser.
fn start_tags(html: &str) -> Vec<Tag> {
    let mut tags = Vec::new();
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        if let Some(comment) = rest.strip_prefix("!--") {
            let end = comment.find("-->").expect("an unclosed comment");
            rest = &comment[end + 3..];
            continue;
        }
        if !rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            rest = &rest[rest.find('>').expect("an unclosed tag") + 1..];
            continue;
        }
        let name_end = rest
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .expect("an unclosed tag");
        let name = rest[..name_end].to_ascii_lowercase();
        rest = &rest[name_end..];
        let mut attributes = Vec::new();
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '/');
            if let Some(after) = rest.strip_prefix('>') {
                rest = after;
                break;
            }
            let attr_end = rest
                .find(|c: char| c.is_whitespace() || c == '=' || c == '>' || c == '/')
                .expect("an unclosed tag");
            let attr = rest[..attr_end].to_ascii_lowercase();
            rest = &rest[attr_end..];
            let mut value = String::new();
            if let Some(after) = rest.strip_prefix('=') {
                let (quote, body) = match after.chars().next() {
                    Some(q @ ('"' | '\'')) => (Some(q), &after[1..]),
                    _ => (None, after),
                };
                let end = match quote {
                    Some(q) => body.find(q).expect("an unclosed attribute value"),
                    None => body
                        .find(|c: char| c.is_whitespace() || c == '>')
                        .expect("an unclosed tag"),
                };
                value = body[..end].to_owned();
                rest = &body[end + usize::from(quote.is_some())..];
            }
            attributes.push((attr, value));
        }
        let text_after = rest[..rest.find('<').unwrap_or(rest.len())].to_owned();
        tags.push(Tag {
            name,
            attributes,
            text_after,
        });
    }
    tags
}

/// The sources a CSP allows for `directive`, falling back to `default-src` as browsers do.
fn csp_sources(csp: &str, directive: &str) -> Vec<String> {
    let directives: Vec<Vec<&str>> = csp
        .split(';')
        .map(|d| d.split_whitespace().collect())
        .filter(|d: &Vec<&str>| !d.is_empty())
        .collect();
    let find = |name: &str| {
        directives
            .iter()
            .find(|d| d[0].eq_ignore_ascii_case(name))
            .map(|d| d[1..].iter().map(|s| s.to_string()).collect())
    };
    find(directive)
        .or_else(|| find("default-src"))
        .unwrap_or_else(|| panic!("the CSP sets neither {directive} nor default-src: {csp}"))
}

#[test]
fn the_page_needs_no_exception_to_its_csp() {
    // The policy the server sends for pages allows scripts and styles from its own origin only
    // (no inline code, no eval) ...
    let server = start_default();
    for path in ["/", "/no.such.room"] {
        let response: HttpResponse = get(server.http_addr(), path);
        assert!(response.mime() == "text/html", "{path}: {response:?}");
        let csp = response
            .header("content-security-policy")
            .unwrap_or_else(|| panic!("{path} is served without a CSP"));
        for directive in ["script-src", "style-src"] {
            assert_eq!(
                csp_sources(csp, directive),
                ["'self'"],
                "{path}: {directive} in {csp}"
            );
        }
    }
    // ... so the HTML has no inline script, style or handler, and loads nothing from another
    // origin.
    let mut found = Vec::new();
    for (path, html) in files("static", "html") {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for tag in start_tags(&html) {
            let attribute = |name: &str| tag.attributes.iter().find(|(n, _)| n == name);
            if tag.name == "script"
                && (attribute("src").is_none() || !tag.text_after.trim().is_empty())
            {
                found.push(format!("{file}: an inline <script>"));
            }
            if tag.name == "style" {
                found.push(format!("{file}: a <style> element"));
            }
            for (name, value) in &tag.attributes {
                if name == "style" || name.starts_with("on") {
                    found.push(format!("{file}: <{} {name}=…>", tag.name));
                }
                let value = value.trim().to_ascii_lowercase();
                let elsewhere = ["http:", "https:", "//", "javascript:"]
                    .iter()
                    .any(|p| value.starts_with(p));
                if (name == "src" || name == "href") && elsewhere {
                    found.push(format!("{file}: <{} {name}=\"{value}\">", tag.name));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "HTML the CSP would block:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_tag_reader_sees_what_the_csp_check_looks_for() {
    // The CSP check is only as good as `start_tags`: each fault it looks for is seen.
    let tags = start_tags(
        "<!doctype html><!-- <script>x</script> --><p class=a style='color:red'>hi</p>\
         <script>alert(1)</script><script type=\"module\" src=\"/static/app.js\"></script>\
         <img src=//evil.example/x.png onerror=\"go()\"><br/><style>p{}</style>",
    );
    let summary: Vec<String> = tags
        .iter()
        .map(|t| {
            let attributes: Vec<String> = t
                .attributes
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            format!("{} [{}] {:?}", t.name, attributes.join(" "), t.text_after)
        })
        .collect();
    assert_eq!(
        summary,
        [
            r#"p [class=a style=color:red] "hi""#,
            r#"script [] "alert(1)""#,
            r#"script [type=module src=/static/app.js] """#,
            r#"img [src=//evil.example/x.png onerror=go()] """#,
            r#"br [] """#,
            r#"style [] "p{}""#,
        ]
    );
}

#[test]
fn the_page_templates_have_their_placeholders() {
    // index.html is a template the server fills per request; 404.html is served as it is.
    let html = files("static", "html");
    let file = |name: &str| {
        html.iter()
            .find(|(path, _)| path.file_name().is_some_and(|f| f == name))
            .map(|(_, text)| text.as_str())
            .unwrap_or_else(|| panic!("no static/{name}"))
    };
    let index = file("index.html");
    for meta in [
        r#"<meta name="chatroom-room" content="{{ROOM}}">"#,
        r#"<meta name="chatroom-ws-url" content="{{WS_URL}}">"#,
        r#"<meta name="chatroom-ws-port" content="{{WS_PORT}}">"#,
    ] {
        assert!(index.contains(meta), "index.html lacks {meta}");
    }
    let not_found = file("404.html");
    assert!(!not_found.contains("{{"), "404.html has a placeholder");
    assert!(
        not_found.contains("1 to 64"),
        "404.html does not explain room names"
    );
    assert!(
        not_found.contains(r#"href="/""#),
        "404.html does not link home"
    );
}

#[test]
fn every_rust_file_starts_with_a_doc_comment() {
    let missing: Vec<String> = rust_files()
        .into_iter()
        .filter(|(_, text)| !text.starts_with("//!"))
        .map(|(path, _)| path.strip_prefix(ROOT).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files that do not start with a //! comment saying what they are for:\n{}",
        missing.join("\n")
    );
}

#[test]
fn no_rust_file_has_dbg_or_an_ignored_test() {
    // Spelled in two pieces so that this file does not match itself.
    let dbg = concat!("dbg", "!(");
    let ignore = concat!("#[", "ignore");
    assert_none_of(
        &rust_files(),
        &[dbg, ignore],
        "debugging left in, or a test switched off",
    );
}
