// Markdown for the chat page: marked, then DOMPurify with allow-lists, then
// code blocks dressed up (language label, copy button, highlighting).
// Loaded before app.js, which uses window.ChatMarkdown.render().
//
// Every message is Markdown written by someone else (a person, or a model
// that may follow instructions hidden in a file), and every participant sees
// it (issue 13, findings 1 and 2):
// - only the tags Markdown makes: no script, style, form control or button;
// - only these attributes: no id or name (which could stand in for an
//   element of the page), no style, data-* or aria-*; class only on <code>,
//   and only "language-<name>" (the fence's language, for highlighting);
// - images become links, so showing a message fetches nothing from anywhere
//   (an image URL could carry conversation text to a stranger's server).
// People's messages go one step further: HTML they type is shown as text,
// as typed (a "<b>" in a sentence is not markup), while Markdown is rendered.
"use strict";

(function () {
  const MARKDOWN = {
    ALLOWED_TAGS: ["a", "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code", "pre",
      "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "sup", "sub",
      "img"],  // only to be turned into a link below
    ALLOWED_ATTR: ["href", "title", "alt", "src", "start", "align"],
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,  // in DOMPurify's own inert document: an <img> there loads nothing
  };
  const CODE_LANGUAGE = /^language-([A-Za-z0-9_+#.-]{1,30})$/;

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") { node.setAttribute("rel", "noopener noreferrer"); node.setAttribute("target", "_blank"); }
  });
  // The one class kept: a fence's language on <code> (marked writes class="language-python").
  DOMPurify.addHook("uponSanitizeAttribute", (node, data) => {
    if (data.attrName === "class" && node.nodeName === "CODE" && CODE_LANGUAGE.test(data.attrValue)) data.forceKeepAttr = true;
  });

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  // "<br>\n" rather than "<br>": the line break stays in the text (copying, textContent).
  const br = () => "<br>\n";
  const OPTIONS = { gfm: true, breaks: true, async: false };
  const forReplies = new marked.Marked(OPTIONS, { renderer: { br } });
  const forPeople = new marked.Marked(OPTIONS, { renderer: { br, html: (token) => escapeHtml(token.text) } });

  if (window.hljs) hljs.configure({ ignoreUnescapedHTML: true });

  function safeUrl(url) {
    try {
      const u = new URL(url, location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function imageAsLink(img) {
    const url = safeUrl(img.getAttribute("src") || "");
    const label = "Image: " + (img.getAttribute("alt") || url || "(no address)");
    const link = img.ownerDocument.createElement(url ? "a" : "span");
    link.textContent = label;
    if (url) {
      link.setAttribute("href", url);
      link.setAttribute("title", url);  // where it leads, before anyone clicks
      link.setAttribute("rel", "noopener noreferrer");
      link.setAttribute("target", "_blank");
    }
    return link;
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      try { await navigator.clipboard.writeText(text); return true; } catch (e) { /* fall back below */ }
    }
    // Older browsers, or a clipboard permission refused: copy through a selection.
    const area = document.createElement("textarea");
    area.value = text;
    area.className = "sr-only";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }

  // A bar above each code block: its language and a Copy button. Made here,
  // by the page, after sanitizing: nothing from the message becomes a button.
  function dressCodeBlock(pre, highlight) {
    const code = pre.querySelector("code");
    if (!code) return;
    const match = CODE_LANGUAGE.exec(code.getAttribute("class") || "");
    const language = match ? match[1].toLowerCase() : "";
    const doc = pre.ownerDocument;
    if (highlight && window.hljs) {
      if (language && !hljs.getLanguage(language)) code.removeAttribute("class");  // unknown: plain text, no warning
      if (language) hljs.highlightElement(code);  // hljs escapes the text itself: only its own spans are added
    }
    const bar = doc.createElement("div");
    bar.className = "code-bar";
    const label = doc.createElement("span");
    label.className = "code-lang";
    label.textContent = language || "text";
    const copy = doc.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy the " + (language || "text") + " code");
    copy.addEventListener("click", async () => {
      copy.textContent = (await copyText(code.textContent.replace(/\n$/, ""))) ? "Copied" : "Copy failed";
      setTimeout(() => { copy.textContent = "Copy"; }, 2000);
    });
    bar.append(label, copy);
    const wrap = doc.createElement("div");
    wrap.className = "code-block";
    pre.replaceWith(wrap);
    wrap.append(bar, pre);
  }

  // Renders `text` into `target`. `asPerson`: HTML in it is shown as text.
  // `finished`: highlight code (skipped while a reply streams in: it would be
  // redone at every chunk).
  function render(target, text, { asPerson = false, finished = true } = {}) {
    const html = (asPerson ? forPeople : forReplies).parse(text || "");
    const fragment = DOMPurify.sanitize(html, MARKDOWN);
    for (const img of fragment.querySelectorAll("img")) img.replaceWith(imageAsLink(img));
    for (const pre of fragment.querySelectorAll("pre")) dressCodeBlock(pre, finished);
    for (const table of fragment.querySelectorAll("table")) {
      const scroll = table.ownerDocument.createElement("div");
      scroll.className = "table-scroll";  // a wide table scrolls by itself, not the whole message
      table.replaceWith(scroll);
      scroll.append(table);
    }
    target.replaceChildren(fragment);  // into the page only now, without images
  }

  window.ChatMarkdown = Object.freeze({ render, safeUrl });
})();
