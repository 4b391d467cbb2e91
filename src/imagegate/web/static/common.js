// imagegate console: what every page's script needs (CSRF header, links under the root path,
// the theme switch). Loaded with `defer`; no inline scripts anywhere (the CSP forbids them).
"use strict";
(function () {
  const meta = (name) => {
    const node = document.querySelector(`meta[name="${name}"]`);
    return node ? node.getAttribute("content") : "";
  };
  const root = meta("root-path");
  const csrf = meta("csrf-token");

  // Every htmx request carries the session's CSRF token.
  document.addEventListener("htmx:configRequest", (event) => {
    if (csrf) event.detail.headers["X-CSRF-Token"] = csrf;
  });

  /** fetch() on this site: the root path prefixed, the CSRF header added, cookies sent. */
  function api(path, options) {
    const init = Object.assign({ credentials: "same-origin" }, options || {});
    init.headers = Object.assign({}, init.headers || {});
    if (csrf) init.headers["X-CSRF-Token"] = csrf;
    return fetch(root + path, init);
  }

  /** The page's messages for scripts (a JSON data block with id "messages"). */
  function messages() {
    const node = document.getElementById("messages");
    return node ? JSON.parse(node.textContent) : {};
  }

  const themes = ["auto", "light", "dark"];
  function setupThemeToggle() {
    const button = document.getElementById("theme-toggle");
    if (!button) return;
    const names = JSON.parse(button.dataset.themeNames || "{}");
    button.addEventListener("click", () => {
      const html = document.documentElement;
      const current = html.dataset.theme || "auto";
      const next = themes[(themes.indexOf(current) + 1) % themes.length];
      html.dataset.theme = next;
      document.cookie = `theme=${next}; path=${root || "/"}; max-age=31536000; samesite=lax`;
      const label = button.querySelector("span");
      if (label) label.textContent = names[next] || next;
      button.setAttribute("aria-label", button.getAttribute("aria-label").split(":")[0] + ": " + (names[next] || next));
    });
  }

  window.imagegate = { root, csrf, api, messages, url: (path) => root + path };
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", setupThemeToggle);
  } else {
    setupThemeToggle();
  }
})();
