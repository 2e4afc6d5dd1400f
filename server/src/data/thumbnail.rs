//! A sample's first input drawn as a small PNG, for inputs shaped like an image:
//! `[1,C,H,W]` or `[1,H,W,C]` with C 1 (grey) or 3 (RGB), `[1,H,W]` or `[H,W]` (grey), at
//! least 2×2 pixels.
//! Values are min-max normalised over the image; the long side is at most [`MAX_SIDE`]
//! pixels (box-averaged down, never up).

use botfleet_protocol::sample::{Decoded, SampleTensor};
use botfleet_protocol::tensor::DataType;

/// The longest side of a thumbnail, in pixels.
pub const MAX_SIDE: usize = 96;

/// Why a sample has no thumbnail.
#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    #[error("the sample has no input to draw")]
    NoInput,
    #[error(
        "input {name:?} has shape {shape:?}, not an image ([1,C,H,W] or [1,H,W,C] with C 1 or 3, [1,H,W] or [H,W]; H and W at least 2)"
    )]
    NotAnImage { name: String, shape: Vec<usize> },
    #[error("cannot encode the PNG")]
    Encode(#[source] png::EncodingError),
}

/// Where each pixel's channels are in the tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    channels: usize,
    height: usize,
    width: usize,
    /// Channels first (`CHW`), else last (`HWC`).
    planar: bool,
}

impl Layout {
    fn of(shape: &[usize]) -> Option<Self> {
        let colour = |c: usize| c == 1 || c == 3;
        let layout = match *shape {
            [1, c, h, w] if colour(c) => Self {
                channels: c,
                height: h,
                width: w,
                planar: true,
            },
            [1, h, w, c] if colour(c) => Self {
                channels: c,
                height: h,
                width: w,
                planar: false,
            },
            [1, h, w] | [h, w] => Self {
                channels: 1,
                height: h,
                width: w,
                planar: true,
            },
            _ => return None,
        };
        // A side of one pixel is a vector (`[1, 784]` is a batch of one), not an image.
        (layout.height > 1 && layout.width > 1).then_some(layout)
    }

    fn index(&self, c: usize, y: usize, x: usize) -> usize {
        if self.planar {
            (c * self.height + y) * self.width + x
        } else {
            (y * self.width + x) * self.channels + c
        }
    }
}

/// The PNG of `file`'s first input (`decoded` is `file` read by `sample::decode`).
pub fn thumbnail(file: &[u8], decoded: &Decoded) -> Result<Vec<u8>, ThumbnailError> {
    let (input, range) = decoded
        .header
        .inputs
        .first()
        .zip(decoded.ranges.first())
        .ok_or(ThumbnailError::NoInput)?;
    let not_image = || ThumbnailError::NotAnImage {
        name: input.name.clone(),
        shape: input.shape.clone(),
    };
    let layout = Layout::of(&input.shape).ok_or_else(not_image)?;
    let bytes = file.get(range.clone()).ok_or_else(not_image)?;
    let values = to_f32(input, bytes);
    draw(&layout, &values)
}

fn draw(layout: &Layout, values: &[f32]) -> Result<Vec<u8>, ThumbnailError> {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = hi - lo;
    let long = layout.height.max(layout.width);
    let scale = |n: usize| (n * MAX_SIDE).div_ceil(long).clamp(1, n);
    let (out_w, out_h) = if long <= MAX_SIDE {
        (layout.width, layout.height)
    } else {
        (scale(layout.width), scale(layout.height))
    };
    let mut pixels = Vec::with_capacity(out_w * out_h * layout.channels);
    for oy in 0..out_h {
        let (y0, y1) = (oy * layout.height / out_h, (oy + 1) * layout.height / out_h);
        for ox in 0..out_w {
            let (x0, x1) = (ox * layout.width / out_w, (ox + 1) * layout.width / out_w);
            for c in 0..layout.channels {
                let (mut sum, mut n) = (0.0f64, 0u32);
                for y in y0..y1.max(y0 + 1) {
                    for x in x0..x1.max(x0 + 1) {
                        let v = values
                            .get(layout.index(c, y, x))
                            .copied()
                            .unwrap_or(f32::NAN);
                        if v.is_finite() {
                            sum += f64::from(v);
                        }
                        n += 1;
                    }
                }
                let mean = (sum / f64::from(n.max(1))) as f32;
                let level = if span > 0.0 { (mean - lo) / span } else { 0.0 };
                pixels.push((level.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, out_w as u32, out_h as u32);
    encoder.set_color(if layout.channels == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(ThumbnailError::Encode)?;
    writer
        .write_image_data(&pixels)
        .map_err(ThumbnailError::Encode)?;
    writer.finish().map_err(ThumbnailError::Encode)?;
    Ok(png)
}

/// A tensor's raw little-endian values as `f32`.
fn to_f32(tensor: &SampleTensor, bytes: &[u8]) -> Vec<f32> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    match tensor.datatype {
        DataType::Bool | DataType::Uint8 => bytes.iter().map(|&b| f32::from(b)).collect(),
        DataType::Int8 => bytes.iter().map(|&b| f32::from(b as i8)).collect(),
        DataType::Int32 => each(bytes, |a| i32::from_le_bytes(a) as f32),
        DataType::Int64 => each(bytes, |a| i64::from_le_bytes(a) as f32),
        DataType::Fp16 => each(bytes, |a| f16_to_f32(u16::from_le_bytes(a))),
        DataType::Fp32 => each(bytes, f32::from_le_bytes),
        DataType::Fp64 => each(bytes, |a| f64::from_le_bytes(a) as f32),
    }
}

/// IEEE 754 half precision to single.
fn f16_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((bits >> 10) & 0x1f);
    let fraction = f32::from(bits & 0x3ff);
    sign * match exponent {
        0 => fraction * 2f32.powi(-24),
        31 if fraction == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + fraction / 1024.0) * 2f32.powi(e - 15),
    }
}

#[cfg(test)]
mod tests {
    use botfleet_protocol::sample::{self, SampleHeader};

    use super::*;
    use crate::data::record::tests::header as sample_header;

    fn sample(datatype: DataType, shape: Vec<usize>, data: Vec<u8>) -> Vec<u8> {
        let mut header: SampleHeader = sample_header(
            "robot-1",
            sample::CaptureRule::Sampled,
            "2026-01-01T00:00:00Z",
        );
        header.inputs = vec![SampleTensor {
            name: "x".into(),
            datatype,
            shape,
        }];
        sample::encode(&header, &[&data]).unwrap()
    }

    fn decode_png(png: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(png.to_vec()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    fn thumb(file: &[u8]) -> Result<Vec<u8>, ThumbnailError> {
        thumbnail(file, &sample::decode(file).unwrap())
    }

    #[test]
    fn a_grey_nchw_image_is_normalised_min_to_max() {
        let values: Vec<u8> = (0..28 * 28)
            .flat_map(|i| (i as f32 / 10.0 - 3.0).to_le_bytes())
            .collect();
        let (info, pixels) =
            decode_png(&thumb(&sample(DataType::Fp32, vec![1, 1, 28, 28], values)).unwrap());
        assert_eq!((info.width, info.height), (28, 28));
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        assert_eq!((pixels[0], pixels[28 * 28 - 1]), (0, 255));
    }

    #[test]
    fn a_large_rgb_nhwc_image_is_shrunk_to_the_long_side() {
        let (h, w) = (120, 240);
        let values = vec![7u8; h * w * 3];
        let (info, pixels) =
            decode_png(&thumb(&sample(DataType::Uint8, vec![1, h, w, 3], values)).unwrap());
        assert_eq!((info.width, info.height), (96, 48));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert!(pixels.iter().all(|&p| p == 0), "a flat image is black");
    }

    #[test]
    fn other_shapes_are_refused_with_the_shape() {
        for shape in [
            vec![1, 10],
            vec![2, 3, 8, 8],
            vec![1, 2, 8, 8],
            vec![8],
            vec![1, 0, 4],
        ] {
            let n: usize = shape.iter().product();
            let err = thumb(&sample(DataType::Uint8, shape.clone(), vec![0; n])).unwrap_err();
            assert!(
                matches!(err, ThumbnailError::NotAnImage { .. }),
                "{shape:?}: {err}"
            );
        }
        let (info, _) =
            decode_png(&thumb(&sample(DataType::Uint8, vec![4, 5], vec![1; 20])).unwrap());
        assert_eq!((info.width, info.height), (5, 4));
    }

    #[test]
    fn half_floats_convert() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
