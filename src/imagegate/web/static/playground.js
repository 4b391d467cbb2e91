// The playground: builds a Nebula v1 request from the form, submits it as a task, follows the
// task's public event stream, and offers each image as a download, a reference or a snippet.
// User data is only ever set with textContent or as attribute values, never as HTML.
(function () {
  "use strict";

  var dataNode = document.getElementById("playground-data");
  if (!dataNode) return;
  var DATA = JSON.parse(dataNode.textContent);
  var MSG = DATA.messages;
  var URLS = DATA.urls;
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var CSRF = csrfMeta ? csrfMeta.getAttribute("content") : "";

  var form = document.getElementById("pg-form");
  var promptBox = document.getElementById("pg-prompt");
  var modelSelect = document.getElementById("pg-model");
  var fileInput = document.getElementById("pg-files");
  var drop = document.getElementById("pg-drop");
  var refList = document.getElementById("pg-reference-list");
  var quoteLine = document.getElementById("pg-quote");
  var formError = document.getElementById("pg-form-error");
  var results = document.getElementById("pg-result-list");
  var generateButton = document.getElementById("pg-generate");

  var state = { refs: [], turns: [], quoteTimer: 0, quoteSeq: 0 };
  var FIELDS = {
    size: "pg-size",
    quality: "pg-quality",
    output_format: "pg-output-format",
    seed: "pg-seed",
    num_inference_steps: "pg-steps",
    guidance_scale: "pg-guidance",
    strength: "pg-strength",
    negative_prompt: "pg-negative"
  };
  var NUMBERS = { seed: "int", num_inference_steps: "int", guidance_scale: "float", strength: "float" };

  function t(key, values) {
    var text = MSG[key] || key;
    if (!values) return text;
    return text.replace(/\{(\w+)\}/g, function (whole, name) {
      return Object.prototype.hasOwnProperty.call(values, name) ? String(values[name]) : whole;
    });
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) {
      node.setAttribute(name, attrs[name]);
    });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function currentModel() {
    var name = modelSelect ? modelSelect.value : "";
    for (var i = 0; i < DATA.models.length; i++) {
      if (DATA.models[i].name === name) return DATA.models[i];
    }
    return null;
  }

  // ---- the form follows the chosen model -------------------------------------------------

  function capabilities(model) {
    var said = [t("caps_n", { n: model.max_n })];
    said.push(model.references ? t("caps_refs", { count: model.references }) : t("caps_no_refs"));
    if (model.multi_turn) said.push(t("caps_turns"));
    if (model.masks) said.push(t("caps_mask"));
    if (model.priced) said.push(t("caps_priced"));
    return said.join("; ");
  }

  function showModel() {
    var model = currentModel();
    if (!model) return;
    var info = document.getElementById("pg-model-info");
    if (info) info.textContent = [model.description, capabilities(model)].filter(Boolean).join(" — ");
    var demo = document.getElementById("pg-demo");
    if (demo) demo.hidden = !model.demo;
    document.querySelectorAll("[data-control]").forEach(function (box) {
      var name = box.getAttribute("data-control");
      box.hidden = name === "n" ? model.max_n <= 1 : model.controls.indexOf(name) < 0;
    });
    var n = document.getElementById("pg-n");
    n.max = String(Math.min(model.max_n, DATA.max_images));
    if (Number(n.value) > model.max_n) n.value = String(model.max_n);
    var sizes = document.getElementById("pg-sizes");
    sizes.replaceChildren.apply(sizes, model.sizes.map(function (s) { return el("option", { value: s }); }));
    var quality = document.getElementById("pg-quality");
    var chosen = quality.value;
    var options = [el("option", { value: "" }, t("default"))].concat(
      model.qualities.map(function (q) { return el("option", { value: q }, q); })
    );
    quality.replaceChildren.apply(quality, options);
    if (model.qualities.indexOf(chosen) >= 0) quality.value = chosen;
    var refs = document.getElementById("pg-references");
    var hint = document.getElementById("pg-references-hint");
    hint.textContent = model.references ? t("references_hint", { count: model.references }) : t("references_none");
    drop.hidden = !model.references;
    fileInput.disabled = !model.references;
    refs.classList.toggle("pg-disabled", !model.references);
    updateMask();
    scheduleQuote();
  }

  // ---- reference images ------------------------------------------------------------------

  function readAsDataUrl(blob) {
    return new Promise(function (resolve, reject) {
      var reader = new FileReader();
      reader.onload = function () { resolve(String(reader.result)); };
      reader.onerror = function () { reject(reader.error); };
      reader.readAsDataURL(blob);
    });
  }

  function addFiles(files) {
    var images = Array.prototype.filter.call(files, function (f) {
      return /^image\/(png|jpeg|webp)$/.test(f.type);
    });
    return Promise.all(images.map(readAsDataUrl)).then(function (urls) {
      urls.forEach(function (url) { state.refs.push(url); });
      drawRefs();
    });
  }

  function drawRefs() {
    var items = state.refs.map(function (url, index) {
      var item = el("li", { class: "pg-thumb" });
      item.appendChild(el("img", { src: url, alt: t("reference_alt", { number: index + 1 }) }));
      var remove = el("button", { type: "button", class: "pg-remove" }, t("remove"));
      remove.setAttribute("aria-label", t("remove") + " — " + t("reference_alt", { number: index + 1 }));
      remove.addEventListener("click", function () {
        state.refs.splice(index, 1);
        drawRefs();
      });
      item.appendChild(remove);
      return item;
    });
    refList.replaceChildren.apply(refList, items);
    updateMask();
    scheduleQuote();
  }

  fileInput.addEventListener("change", function () {
    addFiles(fileInput.files).then(function () { fileInput.value = ""; });
  });
  ["dragenter", "dragover"].forEach(function (kind) {
    drop.addEventListener(kind, function (event) {
      event.preventDefault();
      drop.classList.add("pg-dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (kind) {
    drop.addEventListener(kind, function () { drop.classList.remove("pg-dragging"); });
  });
  drop.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && !drop.hidden) addFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", function (event) {
    var model = currentModel();
    if (!model || !model.references || !event.clipboardData) return;
    var files = Array.prototype.slice.call(event.clipboardData.files || []);
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });

  // ---- the mask brush (models that take a mask: painted parts may change) ----------------

  var mask = {
    box: document.getElementById("pg-mask"),
    toggle: document.getElementById("pg-mask-toggle"),
    editor: document.getElementById("pg-mask-editor"),
    image: document.getElementById("pg-mask-image"),
    canvas: document.getElementById("pg-mask-canvas"),
    brush: document.getElementById("pg-mask-brush"),
    note: document.getElementById("pg-mask-state"),
    base: "",
    painted: false,
    drawing: false
  };

  function firstImage() {
    // A mask applies to the request's first image: the conversation's, else the first upload.
    for (var i = 0; i < state.turns.length; i++) {
      if (state.turns[i].images.length) return state.turns[i].images[0];
    }
    return state.refs[0] || "";
  }

  function resetMask() {
    var ctx = mask.canvas.getContext("2d");
    ctx.globalCompositeOperation = "source-over";
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, mask.canvas.width, mask.canvas.height);
    mask.painted = false;
    mask.note.textContent = t("mask_off");
  }

  function updateMask() {
    var model = currentModel();
    var base = firstImage();
    mask.box.hidden = !(model && model.masks && base);
    if (base !== mask.base) {
      mask.base = base;
      mask.painted = false;
      if (base) mask.image.src = base;
    }
  }

  mask.image.addEventListener("load", function () {
    mask.canvas.width = mask.image.naturalWidth;
    mask.canvas.height = mask.image.naturalHeight;
    resetMask();
  });
  mask.toggle.addEventListener("click", function () {
    var open = mask.editor.hidden;
    mask.editor.hidden = !open;
    mask.toggle.setAttribute("aria-expanded", String(open));
    mask.toggle.textContent = open ? t("mask_hide") : t("mask_paint");
  });
  document.getElementById("pg-mask-clear").addEventListener("click", resetMask);

  function paint(event) {
    var rect = mask.canvas.getBoundingClientRect();
    if (!rect.width || !rect.height) return;
    var scale = mask.canvas.width / rect.width;
    var ctx = mask.canvas.getContext("2d");
    ctx.globalCompositeOperation = "destination-out";
    ctx.beginPath();
    ctx.arc((event.clientX - rect.left) * scale, (event.clientY - rect.top) * scale,
      (Number(mask.brush.value) / 2) * scale, 0, 2 * Math.PI);
    ctx.fill();
    if (!mask.painted) {
      mask.painted = true;
      mask.note.textContent = t("mask_on");
    }
  }
  mask.canvas.addEventListener("pointerdown", function (event) {
    mask.drawing = true;
    mask.canvas.setPointerCapture(event.pointerId);
    paint(event);
  });
  mask.canvas.addEventListener("pointermove", function (event) { if (mask.drawing) paint(event); });
  ["pointerup", "pointercancel"].forEach(function (kind) {
    mask.canvas.addEventListener(kind, function () { mask.drawing = false; });
  });

  // ---- the conversation (multi-turn) -----------------------------------------------------

  function drawTurns() {
    var box = document.getElementById("pg-conversation");
    var list = document.getElementById("pg-turns");
    box.hidden = state.turns.length === 0;
    list.replaceChildren.apply(list, state.turns.map(function (turn) {
      var item = el("li", { class: "pg-turn pg-turn-" + turn.role });
      item.appendChild(el("strong", {}, turn.role === "user" ? t("you") : t("model_turn")));
      if (turn.text) item.appendChild(el("p", {}, turn.text));
      turn.images.forEach(function (src) {
        item.appendChild(el("img", { src: src, alt: turn.text || t("model_turn") }));
      });
      return item;
    }));
    updateMask();
  }

  document.getElementById("pg-start-over").addEventListener("click", function () {
    state.turns = [];
    drawTurns();
    scheduleQuote();
  });

  function useAsReference(src, job) {
    // The next turn's prompt is the user's to type while the image loads: clear it now, once.
    promptBox.value = "";
    promptBox.focus();
    fetch(src, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error(response.statusText);
        return response.blob();
      })
      .then(readAsDataUrl)
      .then(function (dataUrl) {
        var model = currentModel();
        if (model && model.multi_turn) {
          state.turns = job.history.concat([{ role: "model", text: "", images: [dataUrl] }]);
          state.refs = [];  // they belong to the turn they were sent with
          drawTurns();
          drawRefs();
        } else {
          state.refs = [dataUrl];
          drawRefs();
        }
        scheduleQuote();
      })
      .catch(function (error) { showFormError(String(error)); });
  }

  // ---- the request -----------------------------------------------------------------------

  function buildBody() {
    var model = currentModel();
    var body = { model: model ? model.name : "", response_format: "url" };
    var prompt = promptBox.value;
    var n = Number(document.getElementById("pg-n").value || "1");
    if (n !== 1) body.n = n;
    Object.keys(FIELDS).forEach(function (name) {
      if (!model || model.controls.indexOf(name) < 0) return;
      var raw = document.getElementById(FIELDS[name]).value.trim();
      if (raw === "") return;
      if (NUMBERS[name] === "int") body[name] = parseInt(raw, 10);
      else if (NUMBERS[name] === "float") body[name] = parseFloat(raw);
      else body[name] = raw;
    });
    if (state.turns.length || state.refs.length) {
      var parts = [];
      if (prompt) parts.push({ text: prompt });
      state.refs.forEach(function (url) { parts.push({ image: url }); });
      body.contents = state.turns.map(function (turn) {
        var turnParts = turn.text ? [{ text: turn.text }] : [];
        turn.images.forEach(function (url) { turnParts.push({ image: url }); });
        return { role: turn.role, parts: turnParts };
      }).concat([{ role: "user", parts: parts }]);
    } else {
      body.prompt = prompt;
    }
    if (model && model.masks && mask.painted && !mask.box.hidden) {
      body.mask = mask.canvas.toDataURL("image/png");
    }
    return body;
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF, Accept: "application/json" },
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.json().catch(function () { return { msg: response.statusText }; }).then(function (json) {
        if (!response.ok) throw new Error(json.msg || (json.error && json.error.message) || response.statusText);
        return json;
      });
    });
  }

  function scheduleQuote() {
    clearTimeout(state.quoteTimer);
    state.quoteTimer = setTimeout(updateQuote, 400);
  }

  function updateQuote() {
    var model = currentModel();
    if (!model || !model.priced) {
      quoteLine.textContent = model ? t("quote_free") : "";
      return;
    }
    var seq = ++state.quoteSeq;
    if (!promptBox.value.trim() && !state.turns.length) {
      quoteLine.textContent = "";  // nothing to price yet; the server would say the prompt is missing
      return;
    }
    post(URLS.quote, buildBody()).then(function (quote) {
      if (seq !== state.quoteSeq) return;
      if (quote.free) quoteLine.textContent = t("quote_free");
      else if (quote.unlimited) quoteLine.textContent = t("quote_unlimited", { credits: quote.credits });
      else quoteLine.textContent = t("quote", { credits: quote.credits, balance: quote.balance });
    }).catch(function () {
      if (seq === state.quoteSeq) quoteLine.textContent = "";  // Generate shows the error
    });
  }

  function showFormError(message) {
    formError.hidden = !message;
    formError.textContent = message ? t("error", { message: message }) : "";
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    showFormError("");
    var body = buildBody();
    var sent = { body: body, prompt: promptBox.value, refs: state.refs.slice(), turns: state.turns.slice() };
    generateButton.disabled = true;
    generateButton.textContent = t("generating");
    post(URLS.generate, body)
      .then(function (task) { follow(task, sent); })
      .catch(function (error) { showFormError(error.message); })
      .then(function () {
        generateButton.disabled = false;
        generateButton.textContent = t("generate");
      });
  });

  // ---- one task's card -------------------------------------------------------------------

  function follow(task, sent) {
    document.getElementById("pg-results-empty").hidden = true;
    var card = el("article", { class: "pg-card", "aria-label": sent.prompt || task.task_id });
    card.appendChild(el("p", { class: "pg-card-prompt" }, sent.prompt));
    var status = el("p", { class: "pg-status", role: "status" }, t("status_submitted"));
    var bar = el("progress", { max: "100", "aria-label": t("progress") });
    var previews = el("div", { class: "pg-previews" });
    var images = el("div", { class: "pg-images" });
    var cost = el("p", { class: "pg-cost" });
    var cancel = el("button", { type: "button", class: "pg-cancel" }, t("cancel"));
    [status, bar, previews, images, cost, cancel].forEach(function (node) { card.appendChild(node); });
    results.insertBefore(card, results.firstChild);

    // The conversation up to this request: what "Use as reference" continues from.
    var userTurn = { role: "user", text: sent.prompt, images: sent.refs };
    var job = { history: sent.turns.concat([userTurn]) };

    var source = new EventSource(task.events_url, { withCredentials: true });
    var finished = false;
    function end(message) {
      finished = true;
      refreshHistory();
      source.close();
      cancel.remove();
      bar.remove();
      previews.replaceChildren();
      status.textContent = message;
    }
    function on(kind, handler) {
      source.addEventListener(kind, function (event) {
        var payload = {};
        try { payload = JSON.parse(event.data || "{}"); } catch (e) { payload = {}; }
        handler(payload);
      });
    }
    on("queued", function (d) { status.textContent = t("status_queued", { position: d.position || 0 }); });
    on("started", function () { status.textContent = t("status_started"); });
    on("progress", function (d) {
      if (typeof d.percent === "number") bar.value = d.percent;
      status.textContent = d.step !== null && d.step !== undefined && d.steps
        ? t("status_step", { step: d.step, steps: d.steps })
        : t("status_percent", { percent: d.percent || 0 });
    });
    on("preview", function (d) {
      var id = "preview-" + d.index;
      var img = previews.querySelector('[data-preview="' + id + '"]');
      if (!img) {
        img = el("img", { "data-preview": id, alt: t("preview_alt", { number: (d.index || 0) + 1 }) });
        previews.appendChild(img);
      }
      img.src = "data:image/webp;base64," + d.b64_json;
    });
    on("image", function (d) {
      var src = d.url || "data:image/png;base64," + d.b64_json;
      var figure = imageFigure(src, d.index || 0, sent, job);
      if (d.revised_prompt) {
        figure.insertBefore(el("figcaption", { class: "pg-hint" }, t("drawn_as", { text: d.revised_prompt })), figure.children[1]);
      }
      images.appendChild(figure);
    });
    on("succeeded", function () {
      end(t("status_succeeded"));
      showCost(task.task_url, cost);
    });
    on("failed", function (d) {
      end(t("status_failed", { message: d.error && d.error.message ? d.error.message : "" }));
      card.classList.add("pg-card-failed");
    });
    on("cancelled", function () { end(t("status_cancelled")); });
    source.onerror = function () {
      if (!finished && source.readyState === EventSource.CLOSED) end(t("status_lost"));
    };
    cancel.addEventListener("click", function () {
      cancel.disabled = true;
      fetch(task.cancel_url, {
        method: "DELETE",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": CSRF, Accept: "application/json" }
      }).then(function (response) {
        if (!response.ok) {
          return response.json().then(function (json) { throw new Error(json.msg || response.statusText); });
        }
      }).catch(function (error) {
        cancel.disabled = false;
        status.textContent = t("error", { message: error.message });
      });
    });
  }

  function refreshHistory() {
    var query = document.getElementById("pg-history-q");
    if (window.htmx) {
      window.htmx.ajax("GET", URLS.history, {
        target: "#pg-history-list",
        swap: "innerHTML",
        values: { q: query ? query.value : "" }
      });
    }
  }

  function showCost(url, line) {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (view) {
        if (!view) return;
        if (!view.charge) line.textContent = t("cost_free");
        else if (view.balance === null || view.balance === undefined) line.textContent = t("cost", { credits: view.charge });
        else line.textContent = t("cost_balance", { credits: view.charge, balance: view.balance });
      })
      .catch(function () { /* the images are shown; the cost line stays empty */ });
  }

  function imageFigure(src, index, sent, job) {
    var figure = el("figure", { class: "pg-figure" });
    var img = el("img", { src: src, alt: sent.prompt || "" });
    figure.appendChild(img);
    var actions = el("div", { class: "pg-actions" });
    var download = el("a", { href: src, download: "imagegate-" + (index + 1), class: "pg-button" }, t("download"));
    var reuse = el("button", { type: "button" }, t("use_reference"));
    reuse.addEventListener("click", function () { useAsReference(src, job); });
    actions.appendChild(download);
    actions.appendChild(reuse);
    var output = el("pre", { class: "pg-snippet", hidden: "" });
    var note = el("p", { class: "pg-hint", role: "status" });
    [["copy_curl", curlOf], ["copy_python", pythonOf], ["copy_json", jsonOf]].forEach(function (pair) {
      var button = el("button", { type: "button" }, t(pair[0]));
      button.addEventListener("click", function () { copy(pair[1](sent.body), output, note); });
      actions.appendChild(button);
    });
    figure.appendChild(actions);
    figure.appendChild(note);
    figure.appendChild(output);
    return figure;
  }

  // ---- the request as snippets -----------------------------------------------------------

  function origin() { return window.location.origin + URLS.root; }

  function jsonOf(body) { return JSON.stringify(body, null, 2); }

  function curlOf(body) {
    var json = JSON.stringify(body).replace(/'/g, "'\\''");
    return "curl -s " + origin() + "/v1/images/generations \\\n" +
      "  -H \"Authorization: Bearer $IMAGEGATE_KEY\" -H \"Content-Type: application/json\" \\\n" +
      "  -d '" + json + "'";
  }

  var OPENAI_FIELDS = ["model", "prompt", "n", "size", "quality", "output_format", "response_format"];

  function pythonOf(body) {
    var args = [];
    var missing = [];
    Object.keys(body).forEach(function (name) {
      if (name === "contents") return;
      if (OPENAI_FIELDS.indexOf(name) >= 0) args.push("    " + name + "=" + JSON.stringify(body[name]) + ",");
      else missing.push(name);
    });
    var lines = [
      "import os",
      "from openai import OpenAI",
      "",
      "client = OpenAI(base_url=" + JSON.stringify(origin() + "/v1") + ", api_key=os.environ[\"IMAGEGATE_KEY\"])"
    ];
    var turns = body.contents || [];
    var last = turns.length ? turns[turns.length - 1] : null;
    var images = last ? last.parts.filter(function (p) { return p.image; }).length : 0;
    if (last) {
      var text = last.parts.filter(function (p) { return p.text; }).map(function (p) { return p.text; }).join(" ");
      args.push("    prompt=" + JSON.stringify(text) + ",");
      if (turns.length > 1) missing.push("contents");
    }
    if (images) {
      var files = [];
      for (var i = 1; i <= images; i++) files.push("open(\"reference-" + i + ".png\", \"rb\")");
      args.unshift("    image=[" + files.join(", ") + "],");
      lines.push("result = client.images.edit(");
    } else {
      lines.push("result = client.images.generate(");
    }
    lines = lines.concat(args, [")", "print(result.data[0].url)"]);
    if (missing.length) lines.push("# " + t("python_note", { fields: missing.join(", ") }));
    return lines.join("\n");
  }

  function copy(text, output, note) {
    var shown = text.length > 4000 ? text.replace(/data:image\/[a-z]+;base64,[A-Za-z0-9+/=]{64,}/g, function (m) {
      return m.slice(0, 40) + "…";
    }) : text;
    output.textContent = shown;
    output.hidden = false;
    var done = navigator.clipboard && window.isSecureContext
      ? navigator.clipboard.writeText(text)
      : Promise.reject(new Error("no clipboard"));
    done.then(function () { note.textContent = t("copied"); })
      .catch(function () { note.textContent = t("copy_failed"); });
  }

  // ---- examples and History re-runs ------------------------------------------------------

  function selectModel(name) {
    if (!modelSelect) return false;
    for (var i = 0; i < modelSelect.options.length; i++) {
      if (modelSelect.options[i].value === name) {
        modelSelect.value = name;
        showModel();
        return true;
      }
    }
    return false;
  }

  document.addEventListener("click", function (event) {
    var target = event.target instanceof Element ? event.target : null;
    var example = target && target.closest(".pg-example");
    if (example) {
      promptBox.value = example.getAttribute("data-prompt") || "";
      promptBox.focus();
      scheduleQuote();
      return;
    }
    var rerun = target && target.closest(".pg-rerun");
    if (rerun) {
      var params = {};
      try { params = JSON.parse(rerun.getAttribute("data-params") || "{}"); } catch (e) { params = {}; }
      selectModel(rerun.getAttribute("data-model") || "");
      promptBox.value = rerun.getAttribute("data-prompt") || "";
      document.getElementById("pg-n").value = String(params.n || 1);
      Object.keys(FIELDS).forEach(function (name) {
        var input = document.getElementById(FIELDS[name]);
        input.value = params[name] === undefined || params[name] === null ? "" : String(params[name]);
      });
      state.turns = [];
      drawTurns();
      promptBox.focus();
      promptBox.scrollIntoView({ block: "center" });
      scheduleQuote();
    }
  });

  if (modelSelect) modelSelect.addEventListener("change", showModel);
  form.addEventListener("input", function (event) {
    if (event.target !== promptBox || (currentModel() || {}).priced) scheduleQuote();
  });
  showModel();
})();
