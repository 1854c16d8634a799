//! What the parsers' fuzz tests share: where a JSON text's values are, for mutations that
//! replace them (structure-aware, unlike flipping random bytes).

/// Byte ranges of every number and every string's contents in the JSON text `text`.
pub(crate) fn json_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        if bytes[i].is_ascii_digit() {
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            spans.push((start, i));
        } else if bytes[i] == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            spans.push((start + 1, i.min(bytes.len()) - 1));
        } else {
            i += 1;
        }
    }
    spans
}

#[test]
fn spans_cover_numbers_and_string_contents() {
    let text = r#"{"a": 12, "b\"c": [3.5]}"#;
    let got: Vec<&str> = json_spans(text).into_iter().map(|(a, b)| &text[a..b]).collect();
    assert_eq!(got, ["a", "12", "b\\\"c", "3.5"]);
}
