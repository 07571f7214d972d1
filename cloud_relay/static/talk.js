// Listen and Talk from the browser: a WebRTC audio call to the board. The page makes a
// complete offer (every ICE candidate in it), the relay carries it to the board over MQTT
// and answers with the board's SDP (cloud_relay.webcall); media goes browser <-> board.
import { ApiError, api } from "./app.js";

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

function stop(stream) {
  for (const track of stream?.getTracks() || []) track.stop();
}

/** A call in ``mode`` ("listen": the board's audio only; "talk": both ways). */
export async function webCall(device, mode, audio) {
  // The relay's TURN servers, with credentials minted for this call (none without TURN).
  const { iceServers } = await api("GET", "/api/v1/ice-servers");
  const pc = new RTCPeerConnection({ iceServers });
  let mic = null;
  try {
    // Chromium hides the page's host addresses behind mDNS names (<uuid>.local), which a
    // board does not resolve, unless the page may use the microphone. With TURN a listen
    // call needs no microphone: its relay candidates are addresses the board reaches.
    // Without TURN, Listen asks for the microphone too, sends nothing and stops it once the
    // candidates are gathered: its host addresses are then plain ones the board can check.
    if (mode === "talk" || iceServers.length === 0) {
      mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    }
    if (mode === "talk") {
      for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    pc.addEventListener("track", (event) => {
      audio.srcObject = event.streams[0] || new MediaStream([event.track]);
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    if (mode !== "talk") {
      stop(mic);
      mic = null;
    }
    const answer = await api("POST", `/api/v1/devices/${encodeURIComponent(device)}/calls`,
      { mode, sdp: pc.localDescription.sdp });
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    return {
      call: answer.call,
      pc,
      async hangup() {
        // The hangup first: a connection closed before it makes the board end the call
        // itself (as for a page that went away), and the hangup finds no call any more.
        try {
          await api("DELETE", `/api/v1/calls/${answer.call}`);
        } catch (err) {
          if (!(err instanceof ApiError && err.status === 404)) throw err; // 404: it has ended
        } finally {
          pc.close();
          stop(mic);
          audio.srcObject = null;
        }
      },
    };
  } catch (err) {
    pc.close();
    stop(mic);
    throw err;
  }
}

/** Whether this relay takes calls from the browser (its API documents the endpoint). */
export async function webCallsAvailable() {
  const doc = await api("GET", "/api/v1/openapi.json");
  return "/api/v1/devices/{id}/calls" in doc.paths;
}
