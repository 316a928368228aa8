// The click-to-segment page: open or drop an image, click foreground (left) and background
// (right or shift) points, drag a box; every candidate of the answer is shown with its score,
// the chosen one is overlaid and refined by the next click (its logits handle goes with it).
// The first click sends the image (the decoder embeds it on a miss, through its encoder);
// later clicks send only the embedding id.
import { create } from "@bufbuild/protobuf";
import {
  Code, ConnectError, MaskFormat, PointLabel, PromptSchema, SAM2_PROTOCOLS, SegmentRequestSchema,
  decoderClient, describeError, errorReason, sam2Transport,
  type Sam2Protocol, type SegmentRequest,
} from "../../../clients/ts/src/index";
import { type BinaryMask, paintMask, unpackMask } from "./masks";

interface PagePoint { x: number; y: number; foreground: boolean }
interface PageBox { xMin: number; yMin: number; xMax: number; yMax: number }
interface Candidate { mask: BinaryMask; score: number; logitsHandle: string }
/** A pointer held down: where it started and is now (image px), and where it started on
 *  screen (CSS px, to tell a click from a drag). */
interface Drag { startX: number; startY: number; x: number; y: number; cssStart: [number, number] }

/** One answered click: the prompt as sent and what came back. */
interface Step {
  points: PagePoint[];
  box: PageBox | null;
  logitsHandleSent: string; // the refined candidate's handle ("" on the first click)
  candidates: Candidate[];
  chosen: number;
  roundTripMs: number;
  sentImage: boolean;
}

interface LoadedImage { name: string; bytes: Uint8Array; bitmap: ImageBitmap }

const MASK_COLOUR = [30, 144, 255, 150] as const;
const DRAG_THRESHOLD_CSS_PX = 6;
const REQUEST_TIMEOUT_MS = 120_000;

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

const ui = {
  fileInput: element<HTMLInputElement>("file-input"),
  apiKey: element<HTMLInputElement>("api-key"),
  undo: element<HTMLButtonElement>("undo"),
  clear: element<HTMLButtonElement>("clear"),
  stage: element<HTMLDivElement>("stage"),
  imageLayer: element<HTMLCanvasElement>("image-layer"),
  maskLayer: element<HTMLCanvasElement>("mask-layer"),
  promptLayer: element<HTMLCanvasElement>("prompt-layer"),
  candidates: element<HTMLOListElement>("candidates"),
  timings: element<HTMLOListElement>("timings"),
  status: element<HTMLParagraphElement>("status"),
  error: element<HTMLParagraphElement>("error"),
};

const state = {
  image: null as LoadedImage | null,
  embeddingId: "",
  steps: [] as Step[],
  busy: false,
  requests: 0,
  clicks: 0,
  error: "",
  drag: null as Drag | null,
};

function protocolFromUrl(): Sam2Protocol {
  const asked = new URLSearchParams(location.search).get("protocol") ?? "connect-proto";
  if (!(SAM2_PROTOCOLS as readonly string[]).includes(asked)) {
    throw new Error(`unknown protocol ${asked}; use one of ${SAM2_PROTOCOLS.join(", ")}`);
  }
  return asked as Sam2Protocol;
}

function client() {
  return decoderClient(sam2Transport({ baseUrl: location.origin, protocol: protocolFromUrl(),
    apiKey: ui.apiKey.value.trim() || undefined }));
}

// --- messages -------------------------------------------------------------------------

function showError(message: string): void {
  state.error = message;
  ui.error.textContent = message;
  ui.error.hidden = message === "";
}

function setStatus(message: string): void {
  ui.status.textContent = message;
}

// --- image ----------------------------------------------------------------------------

async function openImage(file: File): Promise<void> {
  let bitmap: ImageBitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showError(`${file.name} is not an image this browser can open`);
    return;
  }
  state.image = { name: file.name, bytes: new Uint8Array(await file.arrayBuffer()), bitmap };
  state.embeddingId = "";
  state.steps = [];
  for (const canvas of [ui.imageLayer, ui.maskLayer, ui.promptLayer]) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  ui.imageLayer.getContext("2d")!.drawImage(bitmap, 0, 0);
  ui.stage.classList.add("loaded");
  showError("");
  setStatus(`${file.name}: ${bitmap.width} x ${bitmap.height}. Click the object.`);
  render();
}

// --- prompts and requests -------------------------------------------------------------

function currentStep(): Step | undefined {
  return state.steps[state.steps.length - 1];
}

function segmentRequest(points: PagePoint[], box: PageBox | null, refine: string,
  attachImage: boolean): SegmentRequest {
  const image = state.image!;
  const prompt = create(PromptSchema, {
    points: points.map((p) => ({ xPx: p.x, yPx: p.y,
      label: p.foreground ? PointLabel.FOREGROUND : PointLabel.BACKGROUND })),
    box: box ? { xMinPx: box.xMin, yMinPx: box.yMin, xMaxPx: box.xMax, yMaxPx: box.yMax }
      : undefined,
    // One point alone is ambiguous: ask for the 3 candidates; more prompts pin it down.
    multimaskOutput: box === null && points.length === 1,
    maskInput: refine ? { case: "logitsHandle", value: refine } : { case: undefined },
  });
  return create(SegmentRequestSchema, {
    embeddingId: state.embeddingId,
    image: attachImage ? { source: { case: "encodedBytes", value: image.bytes } } : undefined,
    prompts: [prompt],
    maskFormat: MaskFormat.RAW_BITS,
  });
}

async function segment(points: PagePoint[], box: PageBox | null): Promise<void> {
  if (!state.image || state.busy) return;
  const previous = currentStep();
  const refine = previous ? previous.candidates[previous.chosen].logitsHandle : "";
  state.busy = true;
  state.clicks += 1;
  document.body.dataset.busy = "true";
  setStatus("segmenting...");
  try {
    let attachImage = state.embeddingId === "";
    const started = performance.now();
    let response;
    try {
      response = await client().segment(segmentRequest(points, box, refine, attachImage),
        { timeoutMs: REQUEST_TIMEOUT_MS });
    } catch (error) {
      // The embedding left every store since the first click: send the image once more.
      const notFound = error instanceof ConnectError && error.code === Code.NotFound
        && errorReason(error) === "EMBEDDING_NOT_FOUND";
      if (!notFound || attachImage) throw error;
      attachImage = true;
      response = await client().segment(segmentRequest(points, box, refine, true),
        { timeoutMs: REQUEST_TIMEOUT_MS });
    }
    const roundTripMs = performance.now() - started;
    const embedding = response.embedding!;
    if (embedding.widthPx !== state.image.bitmap.width
        || embedding.heightPx !== state.image.bitmap.height) {
      throw new Error(`the server read a ${embedding.widthPx} x ${embedding.heightPx} image, `
        + `this browser ${state.image.bitmap.width} x ${state.image.bitmap.height}`);
    }
    state.embeddingId = embedding.embeddingId;
    const result = response.results[0];
    state.steps.push({
      points, box, logitsHandleSent: refine, roundTripMs, sentImage: attachImage,
      candidates: result.candidates.map((c) => ({ mask: unpackMask(c.mask!), score: c.score,
        logitsHandle: c.logitsHandle })),
      chosen: result.bestIndex,
    });
    addTiming(roundTripMs, attachImage);
    showError("");
    setStatus(`embedding ${state.embeddingId.slice(0, 12)}...; ${points.length} point(s)`
      + `${box ? " and a box" : ""}; last click ${roundTripMs.toFixed(0)} ms`);
  } catch (error) {
    showError(describeError(error));
    setStatus("the last click failed; nothing changed");
  } finally {
    state.busy = false;
    state.requests += 1;
    document.body.dataset.busy = "false";
    document.body.dataset.requests = String(state.requests);
    render();
  }
}

function addTiming(roundTripMs: number, sentImage: boolean): void {
  const item = document.createElement("li");
  item.textContent = `click ${state.clicks}: ${roundTripMs.toFixed(0)} ms`
    + (sentImage ? " (sent the image)" : "");
  ui.timings.prepend(item);
}

function addPoint(x: number, y: number, foreground: boolean): void {
  const step = currentStep();
  void segment([...(step?.points ?? []), { x, y, foreground }], step?.box ?? null);
}

function setBox(box: PageBox): void {
  void segment(currentStep()?.points ?? [], box);
}

// --- drawing --------------------------------------------------------------------------

function render(): void {
  const step = currentStep();
  const maskContext = ui.maskLayer.getContext("2d")!;
  maskContext.clearRect(0, 0, ui.maskLayer.width, ui.maskLayer.height);
  if (step) paintMask(maskContext, step.candidates[step.chosen].mask, MASK_COLOUR);
  drawPrompts(step);
  renderCandidates(step);
  ui.undo.disabled = state.steps.length === 0;
  ui.clear.disabled = state.steps.length === 0;
}

function drawPrompts(step: Step | undefined): void {
  const context = ui.promptLayer.getContext("2d")!;
  const { width, height } = ui.promptLayer;
  context.clearRect(0, 0, width, height);
  const scale = width / Math.max(ui.promptLayer.clientWidth, 1); // image px per CSS px
  context.lineWidth = 2 * scale;
  const boxes = [step?.box, state.drag ? boxFromDrag(state.drag) : null];
  for (const box of boxes) {
    if (!box) continue;
    context.strokeStyle = "#ffd400";
    context.strokeRect(box.xMin, box.yMin, box.xMax - box.xMin, box.yMax - box.yMin);
  }
  for (const point of step?.points ?? []) {
    context.beginPath();
    context.arc(point.x, point.y, 6 * scale, 0, 2 * Math.PI);
    context.fillStyle = point.foreground ? "#22c55e" : "#ef4444";
    context.fill();
    context.strokeStyle = "#ffffff";
    context.stroke();
  }
}

function renderCandidates(step: Step | undefined): void {
  ui.candidates.replaceChildren();
  if (!step || !state.image) return;
  const bitmap = state.image.bitmap;
  step.candidates.forEach((candidate, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "candidate";
    button.dataset.index = String(index);
    button.setAttribute("aria-pressed", String(index === step.chosen));
    const thumbnail = document.createElement("canvas");
    thumbnail.width = 160;
    thumbnail.height = Math.max(1, Math.round((160 * bitmap.height) / bitmap.width));
    const context = thumbnail.getContext("2d")!;
    context.drawImage(bitmap, 0, 0, thumbnail.width, thumbnail.height);
    const full = document.createElement("canvas");
    full.width = bitmap.width;
    full.height = bitmap.height;
    paintMask(full.getContext("2d")!, candidate.mask, [255, 80, 0, 170]);
    context.drawImage(full, 0, 0, thumbnail.width, thumbnail.height);
    const label = document.createElement("span");
    label.className = "score";
    label.textContent = `#${index + 1} score ${candidate.score.toFixed(3)}`;
    button.append(thumbnail, label);
    button.addEventListener("click", () => {
      step.chosen = index;
      render();
    });
    const item = document.createElement("li");
    item.append(button);
    ui.candidates.append(item);
  });
}

// --- input ----------------------------------------------------------------------------

function imagePoint(event: PointerEvent): [number, number] {
  const rect = ui.promptLayer.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * ui.promptLayer.width;
  const y = ((event.clientY - rect.top) / rect.height) * ui.promptLayer.height;
  return [Math.min(Math.max(x, 0), ui.promptLayer.width),
    Math.min(Math.max(y, 0), ui.promptLayer.height)];
}

function boxFromDrag(drag: Drag): PageBox {
  return { xMin: Math.min(drag.startX, drag.x), yMin: Math.min(drag.startY, drag.y),
    xMax: Math.max(drag.startX, drag.x), yMax: Math.max(drag.startY, drag.y) };
}

ui.promptLayer.addEventListener("contextmenu", (event) => event.preventDefault());
ui.promptLayer.addEventListener("pointerdown", (event) => {
  if (!state.image || state.busy) return;
  const [x, y] = imagePoint(event);
  ui.promptLayer.setPointerCapture(event.pointerId);
  state.drag = { startX: x, startY: y, x, y, cssStart: [event.clientX, event.clientY] };
});
ui.promptLayer.addEventListener("pointermove", (event) => {
  if (!state.drag) return;
  [state.drag.x, state.drag.y] = imagePoint(event);
  drawPrompts(currentStep());
});
ui.promptLayer.addEventListener("pointerup", (event) => {
  const drag = state.drag;
  state.drag = null;
  if (!drag) return;
  [drag.x, drag.y] = imagePoint(event);
  const moved = Math.hypot(event.clientX - drag.cssStart[0], event.clientY - drag.cssStart[1]);
  const box = boxFromDrag(drag);
  if (moved >= DRAG_THRESHOLD_CSS_PX && box.xMax > box.xMin && box.yMax > box.yMin) {
    setBox(box);
  } else {
    const background = event.button === 2 || event.shiftKey;
    addPoint(drag.startX, drag.startY, !background);
  }
});

ui.fileInput.addEventListener("change", () => {
  const file = ui.fileInput.files?.[0];
  if (file) void openImage(file);
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer?.files?.[0];
  if (file) void openImage(file);
});
ui.undo.addEventListener("click", () => {
  state.steps.pop();
  render();
});
ui.clear.addEventListener("click", () => {
  state.steps = [];
  render();
});
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "z") ui.undo.click();
});

// What a test (or a curious user's console) reads: the page's state as plain data.
(window as unknown as { sam2Page: unknown }).sam2Page = {
  snapshot: () => ({
    embeddingId: state.embeddingId,
    requests: state.requests,
    busy: state.busy,
    error: state.error,
    steps: state.steps.map((s) => ({
      points: s.points, box: s.box, logitsHandleSent: s.logitsHandleSent, chosen: s.chosen,
      roundTripMs: s.roundTripMs, sentImage: s.sentImage,
      candidates: s.candidates.map((c) => ({ score: c.score, area: c.mask.area,
        logitsHandle: c.logitsHandle })),
    })),
  }),
};

try {
  protocolFromUrl();
  render();
} catch (error) {
  showError(describeError(error));
}
