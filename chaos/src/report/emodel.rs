//! Voice quality of a call as the E-model rates it: the transmission rating R and its MOS, for a
//! G.711 call carried in a tunnel, from what the chaos runner measures at the client (when each
//! packet of the voice-like stream was sent and when, if ever, it arrived).
//!
//! The model is ITU-T G.107 (06/2015), "The E-model: a computational model for use in
//! transmission planning", implemented in full (§7.1–§7.7: Ro, Is, Id with its talker-echo,
//! listener-echo and absolute-delay terms, Ie,eff, A) with the default values of §7.7 Table 3
//! for every parameter the runner does not measure, and the R → MOS mapping of Annex B. Only
//! clauses are cited, not equation numbers: the equations were implemented from the
//! Recommendation's formulas, and this file was written without the 06/2015 text at hand to
//! check its equation numbering against.
//!
//! What the runner measures enters the model in three places:
//!
//! - **Ppl**, the packet-loss probability (§7.5), counts the packets that never arrived *and*
//!   those that arrived too late to be played out by a fixed de-jitter buffer
//!   ([`EmodelInput::jitter_buffer_ms`] deep beyond the nominal network delay): to the listener a
//!   late packet is a lost one.
//! - **BurstR**, the burst ratio (§7.5), comes from the pattern of those discards: the mean length
//!   of the observed loss bursts divided by the mean burst length random loss at the same Ppl
//!   would give, 1/(1 − Ppl). (For the two-state Markov loss model §7.5 also describes, with p =
//!   P(loss | previous packet played) and q = P(played | previous packet lost), this is the
//!   same quantity, 1/(p + q); the direct ratio is used because it stays right when a burst
//!   ends the call, where an estimate of q would have nothing to count.)
//! - **Ta**, the mean absolute one-way (mouth-to-ear) delay (§7.4), is the nominal network delay
//!   (the smallest one observed in the call) plus the de-jitter buffer plus a codec and
//!   packetization allowance ([`EmodelInput::codec_delay_ms`]). With a fixed buffer every
//!   packet played is heard exactly that long after it was spoken, so this is also the mean. The
//!   echo paths take the usual symmetric values T = Ta and Tr = 2·Ta.
//!
//! The codec is G.711 with packet-loss concealment, as softphones and gateways run it: Ie = 0
//! and Bpl = 25.1, the provisional planning values of ITU-T G.113 Appendix I ([`Codec::G711_PLC`];
//! without concealment G.113 gives Bpl = 4.3, [`Codec::G711`]). A = 0 (§7.6: a wired,
//! conventional connection has no advantage of access).
//!
//! The E-model rates a whole call: one interruption of a few hundred milliseconds in a
//! two-minute call moves Ppl by a fraction of a percent and R by about one point (see
//! `tests::gap_of_400_ms_in_a_two_minute_call`), even though a listener certainly hears it. The
//! report therefore shows the interruption itself beside the MOS, never the MOS alone.

use serde::{Deserialize, Serialize};

/// The stream's nominal packet spacing: 50 packets/s of 160 bytes of G.711 (plus the 12 bytes of
/// an RTP header: the runner's 172-byte datagrams).
pub const PACKET_INTERVAL_MS: f64 = 20.0;

/// Default depth of the de-jitter buffer beyond the nominal network delay.
pub const DEFAULT_JITTER_BUFFER_MS: f64 = 60.0;

/// Default codec and packetization allowance in the mouth-to-ear delay: one 20 ms packet must be
/// filled before it is sent (G.711 itself adds 0.125 ms of algorithmic delay, neglected).
pub const DEFAULT_CODEC_DELAY_MS: f64 = PACKET_INTERVAL_MS;

/// One packet of a call's stream, as the runner saw it at both ends (both times on one clock).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallSample {
    /// When the sender sent the packet (ms, any origin).
    pub sent_at_ms: f64,
    /// When the receiver got it (ms, same clock), or `None` if it never arrived.
    pub received_at_ms: Option<f64>,
}

/// A codec's parameters in the E-model (§7.5).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Codec {
    /// Equipment impairment factor Ie of the codec without loss.
    pub ie: f64,
    /// Packet-loss robustness factor Bpl.
    pub bpl: f64,
}

impl Codec {
    /// G.711 with packet-loss concealment (G.113 Appendix I: Ie = 0, Bpl = 25.1).
    pub const G711_PLC: Codec = Codec { ie: 0.0, bpl: 25.1 };
    /// G.711 without packet-loss concealment (G.113 Appendix I: Ie = 0, Bpl = 4.3).
    pub const G711: Codec = Codec { ie: 0.0, bpl: 4.3 };
}

/// One call to rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmodelInput {
    /// Every packet of the call's stream, in send order.
    pub samples: Vec<CallSample>,
    /// Codec and packetization allowance added to the mouth-to-ear delay (ms).
    pub codec_delay_ms: f64,
    /// Depth of the fixed de-jitter buffer beyond the nominal (smallest) network delay (ms): a
    /// packet whose network delay exceeds the nominal one by more is discarded as late.
    pub jitter_buffer_ms: f64,
    /// The codec's Ie and Bpl.
    pub codec: Codec,
}

impl EmodelInput {
    /// A G.711 call with concealment, the default buffer and allowance.
    pub fn g711(samples: Vec<CallSample>) -> EmodelInput {
        EmodelInput {
            samples,
            codec_delay_ms: DEFAULT_CODEC_DELAY_MS,
            jitter_buffer_ms: DEFAULT_JITTER_BUFFER_MS,
            codec: Codec::G711_PLC,
        }
    }
}

/// A call's rating, and the measurements it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallQuality {
    /// Transmission rating R (§7.1); 93.2 is the best a G.711 call gets with default values.
    pub r: f64,
    /// MOS (conversational quality, estimated) from R (Annex B), 1 to 4.5.
    pub mos: f64,
    /// Ppl as a fraction: packets lost or discarded late over packets sent.
    pub loss_ratio: f64,
    /// BurstR (§7.5): 1 for random loss, above 1 for bursty loss. When every packet was lost it
    /// is undefined, and reported as the number of packets (one burst as long as the call).
    pub burst_r: f64,
    /// Ta, the mouth-to-ear delay of the packets played (ms).
    pub mean_one_way_delay_ms: f64,
    /// Packets sent.
    pub packets: usize,
    /// Packets that never arrived.
    pub lost: usize,
    /// Packets that arrived after their playout instant (discarded by the de-jitter buffer).
    pub late: usize,
    /// Effective equipment impairment Ie,eff (§7.5): what the losses cost in R.
    pub ie_eff: f64,
    /// Delay impairment Id (§7.4): what Ta costs in R.
    pub id: f64,
}

/// Rates a call: see the module documentation for how the measurements map onto the E-model.
///
/// A call with no samples is rated as one in which nothing was heard (every packet lost): an
/// empty measurement must not look like a perfect call.
pub fn assess(input: &EmodelInput) -> CallQuality {
    let samples = &input.samples;
    let packets = samples.len();
    // The nominal network delay: the smallest observed. On a shared clock it is the path's
    // propagation and processing delay; with offset clocks only differences would be meaningful,
    // which is all the playout deadline uses.
    let nominal = samples
        .iter()
        .filter_map(|s| s.received_at_ms.map(|r| r - s.sent_at_ms))
        .filter(|d| d.is_finite())
        .min_by(f64::total_cmp);
    let jitter_buffer = input.jitter_buffer_ms.max(0.0);
    let mut lost = 0;
    let mut late = 0;
    let mut bursts = 0;
    let mut previous_discarded = false;
    for s in samples {
        let discarded = match (s.received_at_ms, nominal) {
            (Some(r), Some(nominal)) if (r - s.sent_at_ms).is_finite() => {
                let is_late = r - s.sent_at_ms > nominal + jitter_buffer;
                late += usize::from(is_late);
                is_late
            }
            _ => {
                lost += 1;
                true
            }
        };
        if discarded && !previous_discarded {
            bursts += 1;
        }
        previous_discarded = discarded;
    }
    let discarded = lost + late;
    let loss_ratio = if packets == 0 {
        1.0
    } else {
        discarded as f64 / packets as f64
    };
    let burst_r = if discarded == 0 {
        1.0
    } else if discarded == packets {
        packets as f64
    } else {
        // Mean observed burst length over the mean burst length of random loss, 1/(1 − Ppl).
        discarded as f64 / bursts as f64 * (1.0 - loss_ratio)
    };
    let ta = nominal.unwrap_or(0.0).max(0.0) + jitter_buffer + input.codec_delay_ms.max(0.0);
    let mut model = G107 {
        ie: input.codec.ie,
        bpl: input.codec.bpl,
        ppl: loss_ratio * 100.0,
        burst_r,
        ..G107::default()
    }
    .with_delay(ta);
    if packets == 0 {
        // Nothing played (see `Rating::ie_eff`).
        model.ppl = 100.0;
    }
    let rating = model.rating();
    CallQuality {
        r: rating.r,
        mos: r_to_mos(rating.r),
        loss_ratio,
        burst_r,
        mean_one_way_delay_ms: ta,
        packets,
        lost,
        late,
        ie_eff: rating.ie_eff,
        id: rating.id,
    }
}

/// The MOS (conversational quality, estimated: MOS-CQE) of a transmission rating R, G.107 (06/2015)
/// Annex B: 1 for R < 0, 1 + 0.035·R + R·(R − 60)·(100 − R)·7·10⁻⁶ for 0 < R < 100, 4.5 for
/// R > 100 (the polynomial is continuous at both ends). A NaN R gives 1.
///
/// For 0 < R < 6.5 the polynomial dips slightly below 1 (to 0.989 at R ≈ 3.2); the MOS scale
/// starts at 1, so the result is bounded there: a rating that low is a call nobody can hold.
pub fn r_to_mos(r: f64) -> f64 {
    if r.is_nan() || r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        (1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7.0e-6).max(1.0)
    }
}

/// The input parameters of the E-model, G.107 (06/2015) §7, named as there. [`G107::default`]
/// gives the default values of §7.7 Table 3 (R = 93.2).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct G107 {
    /// Send loudness rating SLR (dB).
    pub slr: f64,
    /// Receive loudness rating RLR (dB).
    pub rlr: f64,
    /// Sidetone masking rating STMR (dB).
    pub stmr: f64,
    /// Listener sidetone rating LSTR (dB).
    pub lstr: f64,
    /// D-value of the telephone, send side, Ds.
    pub ds: f64,
    /// D-value of the telephone, receive side, Dr (enters only through LSTR = STMR + Dr).
    pub dr: f64,
    /// Talker echo loudness rating TELR (dB).
    pub telr: f64,
    /// Weighted echo path loss WEPL (dB).
    pub wepl: f64,
    /// Mean one-way delay of the echo path T (ms).
    pub t: f64,
    /// Round-trip delay in a 4-wire loop Tr (ms).
    pub tr: f64,
    /// Absolute delay in echo-free connections Ta (ms).
    pub ta: f64,
    /// Number of quantization distortion units qdu.
    pub qdu: f64,
    /// Equipment impairment factor Ie.
    pub ie: f64,
    /// Packet-loss robustness factor Bpl.
    pub bpl: f64,
    /// Random packet-loss probability Ppl (%).
    pub ppl: f64,
    /// Burst ratio BurstR.
    pub burst_r: f64,
    /// Circuit noise referred to the 0 dBr point Nc (dBm0p).
    pub nc: f64,
    /// Noise floor at the receive side Nfor (dBmp).
    pub nfor: f64,
    /// Room noise at the send side Ps (dB(A)).
    pub ps: f64,
    /// Room noise at the receive side Pr (dB(A)).
    pub pr: f64,
    /// Advantage factor A.
    pub a: f64,
    /// Delay sensitivity sT (1: the default class, for conversational telephony).
    pub s_t: f64,
    /// Minimum perceivable delay mT (ms).
    pub m_t: f64,
}

impl Default for G107 {
    /// §7.7 Table 3. Bpl's default, 4.3, is G.711 without concealment; it plays no part at
    /// Ppl = 0.
    fn default() -> G107 {
        G107 {
            slr: 8.0,
            rlr: 2.0,
            stmr: 15.0,
            lstr: 18.0,
            ds: 3.0,
            dr: 3.0,
            telr: 65.0,
            wepl: 110.0,
            t: 0.0,
            tr: 0.0,
            ta: 0.0,
            qdu: 1.0,
            ie: 0.0,
            bpl: 4.3,
            ppl: 0.0,
            burst_r: 1.0,
            nc: -70.0,
            nfor: -64.0,
            ps: 35.0,
            pr: 35.0,
            a: 0.0,
            s_t: 1.0,
            m_t: 100.0,
        }
    }
}

/// R and its terms (§7.1: R = Ro − Is − Id − Ie,eff + A).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    /// Basic signal-to-noise ratio Ro (§7.2).
    pub ro: f64,
    /// Simultaneous impairment factor Is (§7.3).
    pub is: f64,
    /// Talker-echo impairment Idte (§7.4).
    pub idte: f64,
    /// Listener-echo impairment Idle (§7.4).
    pub idle: f64,
    /// Impairment of too long an absolute delay Idd (§7.4).
    pub idd: f64,
    /// Delay impairment factor Id = Idte + Idle + Idd (§7.4).
    pub id: f64,
    /// Effective equipment impairment factor Ie,eff (§7.5). Bounded here by 95, which is also
    /// its value when Ppl = 100 % (nothing heard): the formula is built for partial loss, and at
    /// total loss it would give 95·100/(100/BurstR + Bpl), 76 for random loss and Bpl = 25.1,
    /// while heavy *and* bursty loss takes it past 95 — either way only moving an R already
    /// below 0.
    pub ie_eff: f64,
    /// Advantage factor A (§7.6).
    pub a: f64,
    /// Transmission rating R (§7.1).
    pub r: f64,
}

impl G107 {
    /// These parameters with the delays of a symmetric connection whose absolute one-way delay is
    /// `ta_ms`: Ta = T = `ta_ms`, Tr = 2·`ta_ms`.
    pub fn with_delay(self, ta_ms: f64) -> G107 {
        G107 {
            t: ta_ms,
            tr: 2.0 * ta_ms,
            ta: ta_ms,
            ..self
        }
    }

    /// Computes R and its terms.
    pub fn rating(&self) -> Rating {
        let p10 = |x: f64| 10f64.powf(x);
        // §7.2: Ro from the noise sources summed at the 0 dBr point, No.
        let olr = self.slr + self.rlr;
        let nos =
            self.ps - self.slr - self.ds - 100.0 + 0.004 * (self.ps - olr - self.ds - 14.0).powi(2);
        let pre = self.pr + 10.0 * (1.0 + p10((10.0 - self.lstr) / 10.0)).log10();
        let nor = self.rlr - 121.0 + pre + 0.008 * (pre - 35.0).powi(2);
        let nfo = self.nfor + self.rlr;
        let no = 10.0
            * (p10(self.nc / 10.0) + p10(nos / 10.0) + p10(nor / 10.0) + p10(nfo / 10.0)).log10();
        let ro = 15.0 - 1.5 * (self.slr + no);

        // §7.3: Is = Iolr + Ist + Iq.
        let x = olr + 0.2 * (64.0 + no - self.rlr);
        let iolr = 20.0 * ((1.0 + (x / 8.0).powi(8)).powf(1.0 / 8.0) - x / 8.0);
        let stmro = -10.0
            * (p10(-self.stmr / 10.0) + (-self.t / 4.0).exp() * p10(-self.telr / 10.0)).log10();
        let ist = 12.0 * (1.0 + ((stmro - 13.0) / 6.0).powi(8)).powf(1.0 / 8.0)
            - 28.0 * (1.0 + ((stmro + 1.0) / 19.4).powi(35)).powf(1.0 / 35.0)
            - 13.0 * (1.0 + ((stmro - 3.0) / 33.0).powi(13)).powf(1.0 / 13.0)
            + 29.0;
        let q = 37.0 - 15.0 * self.qdu.log10();
        let g = 1.07 + 0.258 * q + 0.0602 * q * q;
        let z = 46.0 / 30.0 - g / 40.0;
        let y = (ro - 100.0) / 15.0 + 46.0 / 8.4 - g / 9.0;
        let iq = 15.0 * (1.0 + p10(y) + p10(z)).log10();
        let is = iolr + ist + iq;

        // §7.4: Id = Idte + Idle + Idd.
        let idte = if self.t < 1.0 {
            // Echo this close to the talker is heard as sidetone.
            0.0
        } else {
            let roe = -1.5 * (no - self.rlr);
            let terv = self.telr - 40.0 * ((1.0 + self.t / 10.0) / (1.0 + self.t / 150.0)).log10()
                + 6.0 * (-0.3 * self.t * self.t).exp();
            // A low sidetone masking rating makes echo more audible (TERVs).
            let terv = if self.stmr < 9.0 {
                terv + ist / 2.0
            } else {
                terv
            };
            let re = 80.0 + 2.5 * (terv - 14.0);
            ((roe - re) / 2.0 + ((roe - re).powi(2) / 4.0 + 100.0).sqrt() - 1.0)
                * (1.0 - (-self.t).exp())
        };
        // A high STMR: Idtes = √(Idte² + Ist²) in place of Idte.
        let idte = if self.stmr > 20.0 {
            (idte * idte + ist * ist).sqrt()
        } else {
            idte
        };
        let rle = 10.5 * (self.wepl + 7.0) * (self.tr + 1.0).powf(-0.25);
        let idle = (ro - rle) / 2.0 + ((ro - rle).powi(2) / 4.0 + 169.0).sqrt();
        let idd = if self.ta <= self.m_t {
            0.0
        } else {
            let x = (self.ta / self.m_t).log10() / 2f64.log10();
            let e = 6.0 * self.s_t;
            25.0 * ((1.0 + x.powf(e)).powf(1.0 / e) - 3.0 * (1.0 + (x / 3.0).powf(e)).powf(1.0 / e)
                + 2.0)
        };
        let id = idte + idle + idd;

        // §7.5: Ie,eff = Ie + (95 − Ie)·Ppl/(Ppl/BurstR + Bpl).
        let ppl = self.ppl.clamp(0.0, 100.0);
        let ie_eff = if ppl == 0.0 {
            self.ie
        } else if ppl == 100.0 {
            95.0
        } else {
            (self.ie + (95.0 - self.ie) * ppl / (ppl / self.burst_r + self.bpl)).min(95.0)
        };

        let r = ro - is - id - ie_eff + self.a;
        Rating {
            ro,
            is,
            idte,
            idle,
            idd,
            id,
            ie_eff,
            a: self.a,
            r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    /// A call of `n` packets every 20 ms, each delayed by `delay(i)` or lost (`None`).
    fn call(n: usize, delay: impl Fn(usize) -> Option<f64>) -> Vec<CallSample> {
        (0..n)
            .map(|i| {
                let sent = i as f64 * PACKET_INTERVAL_MS;
                CallSample {
                    sent_at_ms: sent,
                    received_at_ms: delay(i).map(|d| sent + d),
                }
            })
            .collect()
    }

    #[test]
    fn defaults_give_r_93_2() {
        let rating = G107::default().rating();
        // Ro ≈ 94.77 and Is ≈ 1.41 are the figures usually quoted for the defaults; Id ≈ 0.15
        // (listener echo at Tr = 0); together the familiar 93.2.
        assert!(close(rating.ro, 94.77, 0.01), "{rating:?}");
        assert!(close(rating.is, 1.41, 0.01), "{rating:?}");
        assert!(close(rating.r, 93.2, 0.05), "{rating:?}");
        assert_eq!(rating.ie_eff, 0.0);
        assert!(close(r_to_mos(rating.r), 4.41, 0.005));
    }

    #[test]
    fn mos_of_r() {
        assert_eq!(r_to_mos(-5.0), 1.0);
        assert_eq!(r_to_mos(0.0), 1.0);
        assert_eq!(r_to_mos(f64::NAN), 1.0);
        assert_eq!(r_to_mos(100.0), 4.5);
        assert_eq!(r_to_mos(120.0), 4.5);
        // 1 + 0.035·50 + 50·(−10)·50·7e-6 = 2.75 − 0.175.
        assert!(close(r_to_mos(50.0), 2.575, 1e-12));
        // R = 60 is where the cubic term vanishes: 1 + 2.1.
        assert!(close(r_to_mos(60.0), 3.1, 1e-12));
        // 1 + 2.8 + 80·20·20·7e-6 = 3.8 + 0.224 (the G.109 "satisfied" boundary ≈ 4.0).
        assert!(close(r_to_mos(80.0), 4.024, 1e-12));
        assert!(close(
            r_to_mos(90.0),
            1.0 + 3.15 + 90.0 * 30.0 * 10.0 * 7e-6,
            1e-12
        ));
        assert!(close(r_to_mos(99.999), 4.5, 1e-3));
        // Bounded where the polynomial dips below 1, then increasing.
        assert_eq!(r_to_mos(3.2), 1.0);
        let mut last = 1.0;
        for r in 7..100 {
            let m = r_to_mos(f64::from(r));
            assert!(m > last, "MOS({r}) = {m} ≤ {last}");
            last = m;
        }
    }

    #[test]
    fn idd_follows_the_absolute_delay() {
        let idd = |ta: f64| G107::default().with_delay(ta).rating().idd;
        assert_eq!(idd(100.0), 0.0);
        // Ta = 200 ms: X = 1, 25·((2)^(1/6) − 3·(1 + 3⁻⁶)^(1/6) + 2) ≈ 25·(1.12246 − 3.00069 + 2).
        assert!(close(idd(200.0), 3.044, 0.005), "{}", idd(200.0));
        // Ta = 400 ms: X = 2, 25·((65)^(1/6) − 3·(1 + (2/3)⁶)^(1/6) + 2) ≈ 25·(2.00612 − 3.04339 + 2).
        assert!(close(idd(400.0), 24.07, 0.01), "{}", idd(400.0));
    }

    #[test]
    fn a_clean_call_at_20_ms() {
        // Ta = 20 ms: only the echo terms (TELR = 65 dB, WEPL = 110 dB) cost anything.
        let rating = G107::default().with_delay(20.0).rating();
        assert!(close(rating.r, 92.5, 0.1), "{rating:?}");
        assert!(close(r_to_mos(rating.r), 4.4, 0.01));
    }

    #[test]
    fn one_percent_random_loss() {
        let base = G107 {
            bpl: Codec::G711_PLC.bpl,
            ..G107::default()
        };
        let lossy = G107 { ppl: 1.0, ..base };
        let drop = base.rating().r - lossy.rating().r;
        // 95·1/(1/1 + 25.1) = 3.64.
        assert!(close(drop, 95.0 / 26.1, 1e-9), "{drop}");
    }

    #[test]
    fn a_lossless_call_rates_by_its_delay() {
        // Two minutes, 1 ms of network delay ± 5 ms of jitter, all within the buffer.
        let samples = call(6000, |i| Some(1.0 + (i % 11) as f64 * 0.5));
        let quality = assess(&EmodelInput::g711(samples));
        assert_eq!((quality.packets, quality.lost, quality.late), (6000, 0, 0));
        assert_eq!(quality.loss_ratio, 0.0);
        assert_eq!(quality.burst_r, 1.0);
        // Ta = 1 (network) + 60 (buffer) + 20 (packetization).
        assert!(close(quality.mean_one_way_delay_ms, 81.0, 1e-9));
        assert_eq!(quality.ie_eff, 0.0);
        let expected = G107::default().with_delay(81.0).rating().r;
        assert!(close(quality.r, expected, 1e-9));
        assert!(quality.mos > 4.35 && quality.mos < 4.41, "{quality:?}");
    }

    #[test]
    fn late_packets_are_lost_packets() {
        // Every 10th packet takes 100 ms more than the others: beyond the 60 ms buffer.
        let samples = call(1000, |i| Some(if i % 10 == 5 { 102.0 } else { 2.0 }));
        let quality = assess(&EmodelInput::g711(samples.clone()));
        assert_eq!((quality.lost, quality.late), (0, 100));
        assert!(close(quality.loss_ratio, 0.1, 1e-12));
        // A deeper buffer plays them, at the cost of delay.
        let deep = assess(&EmodelInput {
            jitter_buffer_ms: 120.0,
            ..EmodelInput::g711(samples)
        });
        assert_eq!((deep.lost, deep.late), (0, 0));
        assert!(close(deep.mean_one_way_delay_ms, 142.0, 1e-9));
        assert!(deep.r > quality.r);
    }

    #[test]
    fn burst_ratio() {
        // 1 packet in 20 lost, evenly spread: bursts of 1, shorter than random loss's mean
        // 1/(1 − 0.05) ≈ 1.053: BurstR = 0.95.
        let spread = assess(&EmodelInput::g711(call(2000, |i| {
            (i % 20 != 7).then_some(1.0)
        })));
        assert!(close(spread.loss_ratio, 0.05, 1e-12));
        assert!(close(spread.burst_r, 0.95, 1e-12));
        // The same 5% in bursts of 10: BurstR = 10·0.95 = 9.5.
        let bursty = assess(&EmodelInput::g711(call(2000, |i| {
            (i % 200 >= 10).then_some(1.0)
        })));
        assert!(close(bursty.loss_ratio, 0.05, 1e-12));
        assert!(close(bursty.burst_r, 9.5, 1e-12));
        // Bursty loss is the worse: Ie,eff = 95·5/(5/9.5 + 25.1) = 18.53 against
        // 95·5/(5/0.95 + 25.1) = 15.64.
        assert!(close(bursty.ie_eff, 95.0 * 5.0 / (5.0 / 9.5 + 25.1), 1e-9));
        assert!(close(spread.ie_eff, 95.0 * 5.0 / (5.0 / 0.95 + 25.1), 1e-9));
        assert!(bursty.r < spread.r && bursty.mos < spread.mos);
        // And at the same ratio, bursty loss is worse than random loss (BurstR = 1).
        let random = G107 {
            bpl: 25.1,
            ppl: 5.0,
            ..G107::default()
        }
        .with_delay(bursty.mean_one_way_delay_ms)
        .rating();
        assert!(bursty.r < random.r);
    }

    #[test]
    fn gap_of_400_ms_in_a_two_minute_call() {
        // The voice stream of a two-minute call (6,000 packets), 1 ms of network delay, and a
        // failover that loses 20 consecutive packets (400 ms of speech) one minute in.
        let clean = assess(&EmodelInput::g711(call(6000, |_| Some(1.0))));
        let gap = assess(&EmodelInput::g711(call(6000, |i| {
            (!(3000..3020).contains(&i)).then_some(1.0)
        })));
        assert_eq!((gap.lost, gap.late), (20, 0));
        // By hand: Ppl = 20/6000 = 0.3333 %; one burst of 20 where random loss at that Ppl gives
        // bursts of 1/(1 − 0.003333) = 1.00334, so BurstR = 20·(1 − 0.003333) = 19.933.
        // Ie,eff = 95·0.3333/(0.3333/19.933 + 25.1) = 31.667/25.1167 = 1.2608.
        // Ta = 1 + 60 + 20 = 81 ms < mT: no Idd; Id = Idte + Idle at T = 81, Tr = 162:
        //   Idte: TERV = 65 − 40·log10(9.1/1.54) = 34.135, Re = 130.34, Roe = 94.77,
        //         Idte = −17.783 + √(316.2 + 100) − 1 = 1.617;
        //   Idle: Rle = 1228.5·163^−0.25 = 343.37, Idle = −124.30 + √(15450 + 169) = 0.677;
        // so R(clean) = 94.77 − 1.41 − 2.29 = 91.06 → MOS 4.36 (4.2 + 0.159),
        // and R(gap) = 91.06 − 1.26 = 89.80 → MOS 4.33: the 400 ms gap costs ≈ 0.03 MOS.
        assert!(close(gap.loss_ratio, 1.0 / 300.0, 1e-12));
        assert!(close(gap.burst_r, 20.0 * (1.0 - 1.0 / 300.0), 1e-9));
        assert!(close(gap.ie_eff, 1.2608, 0.0005), "{gap:?}");
        assert!(close(clean.id, 2.29, 0.01), "{clean:?}");
        assert!(close(clean.r, 91.06, 0.02), "{clean:?}");
        assert!(close(gap.r, 89.80, 0.02), "{gap:?}");
        assert!(close(clean.mos, 4.36, 0.005), "{clean:?}");
        assert!(close(gap.mos, 4.33, 0.005), "{gap:?}");
        assert!(close(clean.mos - gap.mos, 0.03, 0.005));
        // Burstiness hardly matters at this Ppl: random loss of 20 packets costs nearly as much
        // (Ppl/BurstR is small beside Bpl).
        let random = G107 {
            bpl: 25.1,
            ppl: 100.0 / 300.0,
            ..G107::default()
        }
        .rating();
        assert!(close(random.ie_eff, 1.245, 0.001), "{random:?}");
    }

    #[test]
    fn nothing_heard() {
        let silent = assess(&EmodelInput::g711(call(100, |_| None)));
        assert_eq!((silent.lost, silent.loss_ratio), (100, 1.0));
        assert_eq!(silent.ie_eff, 95.0);
        assert!(silent.r < 0.0);
        assert_eq!(silent.mos, 1.0);
        let empty = assess(&EmodelInput::g711(Vec::new()));
        assert_eq!((empty.packets, empty.mos), (0, 1.0));
        assert!(empty.r.is_finite() && empty.burst_r.is_finite());
    }

    #[test]
    fn reordering_within_the_buffer_is_harmless() {
        // Odd packets overtaken by 30 ms: still within the 60 ms buffer.
        let samples = call(500, |i| Some(if i % 2 == 1 { 31.0 } else { 1.0 }));
        let quality = assess(&EmodelInput::g711(samples));
        assert_eq!((quality.lost, quality.late), (0, 0));
    }

    #[test]
    fn serializes() {
        let quality = assess(&EmodelInput::g711(call(50, |_| Some(1.0))));
        let json = serde_json::to_string(&quality).unwrap();
        assert!(json.contains("\"mos\":"), "{json}");
        let back: CallQuality = serde_json::from_str(&json).unwrap();
        // serde_json's float parsing may differ from the original in the last bit.
        assert!(close(back.r, quality.r, 1e-9) && close(back.mos, quality.mos, 1e-9));
        assert_eq!((back.packets, back.lost, back.late), (50, 0, 0));
    }
}
