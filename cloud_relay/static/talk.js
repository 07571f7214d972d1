// Listen and Talk from the browser: a WebRTC audio call to the board. The page makes a
// complete offer (every ICE candidate in it), the relay carries it to the board over MQTT
// and answers with the board's SDP (cloud_relay.webcall); media goes browser <-> board.
import { api } from "./app.js";

const GATHER_MS = 5000;

function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, GATHER_MS); // what was gathered by then goes
  });
}

/** A call in ``mode`` ("listen": the board's audio only; "talk": both ways). */
export async function webCall(device, mode, audio) {
  const pc = new RTCPeerConnection();
  let mic = null;
  try {
    if (mode === "talk") {
      mic = await navigator.mediaDevices.getUserMedia({ audio: true });
      for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    pc.addEventListener("track", (event) => {
      audio.srcObject = event.streams[0] || new MediaStream([event.track]);
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const answer = await api("POST", `/api/v1/devices/${encodeURIComponent(device)}/calls`,
      { mode, sdp: pc.localDescription.sdp });
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    return {
      call: answer.call,
      pc,
      async hangup() {
        pc.close();
        for (const track of mic?.getTracks() || []) track.stop();
        await api("DELETE", `/api/v1/calls/${answer.call}`).catch(() => {}); // it may have ended
      },
    };
  } catch (err) {
    pc.close();
    for (const track of mic?.getTracks() || []) track.stop();
    throw err;
  }
}

/** Whether this relay takes calls from the browser (its API documents the endpoint). */
export async function webCallsAvailable() {
  const doc = await api("GET", "/api/v1/openapi.json");
  return "/api/v1/devices/{id}/calls" in doc.paths;
}
