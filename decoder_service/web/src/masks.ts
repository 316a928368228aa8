// Masks from the wire to pixels: the page asks for MASK_FORMAT_RAW_BITS (row-major bits, most
// significant bit first, as numpy.packbits), the cheapest format to decode in a browser.
import type { EncodedMask } from "../../../clients/ts/src/index";

/** One byte per pixel, 1 = mask, row-major, height x width. */
export interface BinaryMask {
  width: number;
  height: number;
  pixels: Uint8Array;
  area: number;
}

export function unpackMask(mask: EncodedMask): BinaryMask {
  const width = mask.widthPx;
  const height = mask.heightPx;
  if (mask.data.case !== "packedBits") {
    throw new Error(`expected packed bits, the server sent ${mask.data.case ?? "no mask"}`);
  }
  const bits = mask.data.value;
  const count = width * height;
  if (bits.length !== Math.ceil(count / 8)) {
    throw new Error(`a ${width} x ${height} mask came with ${bits.length} bytes`);
  }
  const pixels = new Uint8Array(count);
  let area = 0;
  for (let i = 0; i < count; i++) {
    const bit = (bits[i >> 3] >> (7 - (i & 7))) & 1;
    pixels[i] = bit;
    area += bit;
  }
  return { width, height, pixels, area };
}

/** RGBA colour of mask pixels; everything else stays transparent. */
export type Rgba = readonly [number, number, number, number];

export function paintMask(context: CanvasRenderingContext2D, mask: BinaryMask,
  colour: Rgba): void {
  const image = context.createImageData(mask.width, mask.height);
  const data = image.data;
  for (let i = 0; i < mask.pixels.length; i++) {
    if (mask.pixels[i]) {
      const o = i * 4;
      data[o] = colour[0];
      data[o + 1] = colour[1];
      data[o + 2] = colour[2];
      data[o + 3] = colour[3];
    }
  }
  context.putImageData(image, 0, 0);
}
