// Minimal, safe markdown: everything is HTML-escaped first; only a few constructs become tags,
// and links are kept only for http(s) URLs.
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);

function inline(text) {
  return text
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) =>
      `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
}

export function renderMarkdown(source) {
  const text = escapeHtml(source);
  const blocks = text.split(/```/);
  let html = "";
  blocks.forEach((block, i) => {
    if (i % 2 === 1) { html += `<pre><code>${block.replace(/^\w*\n/, "")}</code></pre>`; return; }
    for (const para of block.split(/\n{2,}/)) {
      const lines = para.split("\n").filter((l) => l.trim());
      if (!lines.length) continue;
      if (lines.every((l) => /^\s*[-*+]\s+/.test(l))) {
        html += "<ul>" + lines.map((l) => `<li>${inline(l.replace(/^\s*[-*+]\s+/, ""))}</li>`).join("") + "</ul>";
      } else if (lines.every((l) => /^\s*\d+[.)]\s+/.test(l))) {
        html += "<ol>" + lines.map((l) => `<li>${inline(l.replace(/^\s*\d+[.)]\s+/, ""))}</li>`).join("") + "</ol>";
      } else {
        html += `<p>${lines.map((l) => inline(l.replace(/^#{1,6}\s+/, ""))).join("<br>")}</p>`;
      }
    }
  });
  return html;
}
