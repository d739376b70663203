// The web UI's only script: the repository filter narrows as you type, copy buttons copy (and say
// so through the live region #said), a table's box is a tab stop only while it scrolls.
// Everything works without it (the filter is a GET form; the text to copy is on the page).
"use strict";

function filterAsYouType(input) {
  const results = document.getElementById("results");
  if (!results) return;
  let timer = null;
  let asked = 0;
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const query = input.value.trim();
      const mine = ++asked;
      const params = new URLSearchParams({ partial: "1" });
      if (query) params.set("q", query);
      try {
        const answer = await fetch(input.dataset.filter + "?" + params, { credentials: "same-origin" });
        if (!answer.ok || mine !== asked) return;
        const html = await answer.text();
        if (mine !== asked) return;
        // Rendered and escaped by the server.  Only the count is a live region: its text changes,
        // the table is replaced silently.
        const fresh = document.createElement("template");
        fresh.innerHTML = html;
        const count = fresh.content.getElementById("count");
        const shownCount = document.getElementById("count");
        if (count && shownCount) {
          shownCount.textContent = count.textContent;
          document.title = count.dataset.title + " · mirror";
        }
        const rest = fresh.content.getElementById("results");
        results.replaceChildren(...(rest ? rest.childNodes : []));
        scrollStops();
        const shown = new URLSearchParams();
        if (query) shown.set("q", query);
        history.replaceState(null, "", input.dataset.filter + (query ? "?" + shown : ""));
      } catch (e) {
        // Offline or refused: the form still works.
      }
    }, 120);
  });
}

async function copy(button) {
  const text = button.dataset.copy;
  let done = false;
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(text); done = true; } catch (e) { done = false; }
  }
  if (!done) {  // plain HTTP on another host than localhost: no Clipboard API
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { done = document.execCommand("copy"); } catch (e) { done = false; }
    area.remove();
  }
  const label = button.textContent;
  const said = document.getElementById("said");
  button.textContent = done ? "Copied" : "Select and copy";
  button.classList.toggle("copied", done);
  if (said) said.textContent = done ? "Copied" : "Not copied: select the text and copy it";
  setTimeout(() => {
    button.textContent = label;
    button.classList.remove("copied");
    if (said) said.textContent = "";
  }, 1500);
}

function scrollStops() {
  // A table's box is focusable (to scroll it with the arrow keys) while it is narrower than its table.
  for (const box of document.querySelectorAll(".scroll")) {
    if (box.scrollWidth > box.clientWidth) box.setAttribute("tabindex", "0");
    else box.removeAttribute("tabindex");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.querySelector("input[data-filter]");
  if (input) filterAsYouType(input);
  scrollStops();
  window.addEventListener("resize", scrollStops);
  document.addEventListener("toggle", scrollStops, true);  // a table in <details> shown
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-copy]");
    if (button) copy(button);
  });
  const shortcut = document.getElementById("shortcut");
  if (input && shortcut) offerShortcut(input, shortcut);
});

// "/" focuses the filter, as on many code hosts.  A single-key shortcut can be turned off
// (WCAG 2.1 success criterion 2.1.4): the choice is kept in this browser (localStorage).
const SHORTCUT_KEY = "mirror-ui-shortcut";

let shortcutHere = null;  // the choice made on this page (the browser may keep none)

function shortcutOn() {
  if (shortcutHere !== null) return shortcutHere;
  try { return localStorage.getItem(SHORTCUT_KEY) !== "off"; } catch (e) { return true; }
}

function offerShortcut(input, shortcut) {
  const said = shortcut.querySelector("span");
  const toggle = shortcut.querySelector("button[data-shortcut]");
  const show = () => {
    const on = shortcutOn();
    said.replaceChildren(...(on
      ? ["Press ", Object.assign(document.createElement("kbd"), { textContent: "/" }), " to filter."]
      : ["The / shortcut is off."]));
    toggle.textContent = on ? "Turn the / shortcut off" : "Turn the / shortcut on";
  };
  toggle.addEventListener("click", () => {
    const on = !shortcutOn();
    shortcutHere = on;  // this page's choice, whether or not the browser keeps it
    try { localStorage.setItem(SHORTCUT_KEY, on ? "on" : "off"); } catch (e) { /* this page only */ }
    show();
  });
  show();
  shortcut.hidden = false;
  document.addEventListener("keydown", (event) => {
    if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey || !shortcutOn()) return;
    const active = document.activeElement;
    if (active && (/INPUT|TEXTAREA|SELECT/.test(active.tagName) || active.isContentEditable)) return;
    event.preventDefault();
    input.focus();
  });
}
