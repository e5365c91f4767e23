"""Hypothesis strategies for HTML in the forms the standard's tokenizer has rules for (issue 17).

Unquoted values with '=', quotes, '<' and backticks; attributes whose value holds 'href='; bare,
empty and duplicate attributes; every comment form, bogus comments, DOCTYPE and CDATA; raw-text and
RCDATA elements with tricky ends; <template>, <noscript>, <select>, <svg>/<math> foreign content;
character references of every kind. Shared by the differential test and the property tests.
"""

from __future__ import annotations

from hypothesis import strategies as st

ws = st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "\r", "\f", ""])
url_chars = st.text(alphabet="abcxyz019/?:.#%-_=&;'\"`<>!", max_size=12)
entity = st.sampled_from(["&amp;", "&amp", "&AMP;", "&copy=2", "&copy", "&copyx", "&notin;", "&noti", "&notit;",
                          "&#x41;", "&#65", "&#x;", "&#;", "&#0;", "&#x80;", "&#x9d;", "&#xD800;", "&#x110000;",
                          "&#99999999999;", "&lt;", "&gt", "&quot;", "&nosuch;", "&", "&=", "&amp=", "&ampx"])
value_text = st.tuples(st.sampled_from(["", "https://x.example/", "HTTP://y.example/p?", " https://z.example/ ",
                                         "mailto:a@b.example"]),
                       st.lists(st.one_of(url_chars, entity), max_size=4)).map(lambda t: t[0] + "".join(t[1]))


@st.composite
def attr_value(draw):
    v = draw(value_text)
    q = draw(st.sampled_from(['"', "'", ""]))
    if q:
        v = v.replace(q, "")
    else:  # an unquoted value runs to whitespace or '>' ('=', quotes, '<' and '`' stay in it)
        v = v.replace(">", "").lstrip("\"'") or "x"
    return f"={draw(ws)}{q}{v}{q}" if draw(st.booleans()) else f"{draw(ws)}={draw(ws)}{q}{v}{q}"


attr_name = st.sampled_from(["href", "HREF", "hReF", "title", "class", "data-x", "alt", "src", "style",
                             "x\"y", "'q", "<z", "=eq", "data-notrack", "clicktracking", "color"])


@st.composite
def attribute(draw):
    name = draw(attr_name)
    kind = draw(st.sampled_from(["value", "value", "value", "bare", "decoy", "empty"]))
    if kind == "bare":
        return name
    if kind == "decoy":
        q = draw(st.sampled_from(['"', "'"]))
        return f"{name}={q}see href=https://decoy.example/{draw(url_chars).replace(q, '')}{q}"
    if kind == "empty":
        return f"{name}="
    return name + draw(attr_value())


@st.composite
def tag(draw):
    name = draw(st.sampled_from(["a", "A", "area", "a", "img", "p", "div", "span", "b", "svg", "math", "template",
                                 "select", "table", "td", "font", "desc", "foreignObject", "mi", "body", "br",
                                 "path", "g", "option", "x-y"]))
    closing = draw(st.integers(0, 5)) == 0
    attrs = draw(st.lists(attribute(), max_size=4))
    seps = [draw(st.sampled_from([" ", "\n", "\t", "/", " / ", "\f", "\r"])) for _ in attrs]
    body = "".join(s + a for s, a in zip(seps, attrs))
    end = draw(st.sampled_from([">", ">", "/>", " >", " />"]))
    if body and not body[-1].isspace() and end.startswith("/") and "=" in attrs[-1]:
        end = " " + end  # keep '/' out of an unquoted value where the case wants a self-closing tag
    return f"<{'/' if closing else ''}{name}{body}{end}"


comment = st.sampled_from([
    "<!-->", "<!--->", "<!---->", "<!-- x -->", "<!-- x --!>", "<!--!>", "<!-- a --!-> b -->", "<!-- <!-- n -->",
    "<!-- <!--> ", "<!--[if mso]><a href=\"https://mso.example/\">m</a><![endif]-->", "<![if !mso]>", "<![endif]>",
    "<!foo>", "<!>", "<?xml version=\"1.0\"?>", "<?>", "</ 3>", "</>", "</3 href=x>", "<!DOCTYPE html>",
    "<!doctype html public \"-//W3C//DTD XHTML 1.0//EN\" \"x>y\">", "<!DOCTYPE>", "<![CDATA[ x > <a href=cd> ]]>",
    "<![CDATA[", "]]>", "-->", "--!>", "<!--", "<", "< a href=x>", "<3", "&lt;a href=x&gt;"])

raw = st.sampled_from(["script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes", "noscript",
                       "template", "SCRIPT", "Style"])


@st.composite
def raw_element(draw):
    name = draw(raw)
    inner = draw(st.lists(st.one_of(st.just(f'<a href="https://in.example/{name}">x</a>'), st.just("<!--"),
                                    st.just("-->"), st.just("<script>"), st.just("</script>"),
                                    st.just(f"</{name}"), st.just(f"</{name}x>"), st.just("'\">"), comment),
                          max_size=4))
    close = draw(st.sampled_from([f"</{name}>", f"</{name} >", f"</{name}/>", f"</{name}\n>",
                                  f"</{name} x=\">\">", f"</{name.upper()}>", ""]))
    return f"<{name}>" + "".join(inner) + close


text_bits = st.text(alphabet="ab <>&;=\"'/!-?", max_size=6)
fragment = st.one_of(tag(), tag(), tag(), comment, raw_element(), entity, text_bits,
                     st.just("<svg><![CDATA[ <a href=\"https://cdata.example/\"> > ]]></svg>"),
                     st.just("<math><mi><a href=\"https://mi.example/\">m</a></mi></math>"),
                     st.just("<svg><style><a href=\"https://svgstyle.example/\"></style></svg>"),
                     st.just("<select><option><a href=\"https://sel.example/\">s</a></select>"),
                     st.just("<plaintext>"))


@st.composite
def html_text(draw):
    return "".join(draw(st.lists(fragment, min_size=1, max_size=16)))
