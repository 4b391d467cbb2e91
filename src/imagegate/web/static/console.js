// The operator console's few behaviours: ask before a destructive button submits its form
// (data-confirm), and copy a new key's secret (data-copy). Everything works without it.
"use strict";
(function () {
  document.addEventListener("click", (event) => {
    const button = event.target instanceof Element ? event.target.closest("button") : null;
    if (!button) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
      event.preventDefault();
      return;
    }
    if (button.dataset.copy) copy(button);
  });

  function copy(button) {
    const field = document.getElementById(button.dataset.copy);
    if (!field) return;
    field.select();
    const done = () => {
      button.textContent = button.dataset.copied || button.textContent;
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, () => {});
    } else {
      done();
    }
  }
})();
