// The DICOMweb requests OHIF Viewer v3 makes to show a study, made with the library OHIF makes them with
// (dicomweb-client) and, for frames, as Cornerstone's WADO-RS image loader makes them (its own XHR).
//
//   node ohif_requests.mjs < {"root": ".../dicomweb/cases/<id>", "token": "so_...", "study": "<uid>"}
//
// Prints one JSON document: what each step found, and every request made (method, URL, Accept, status,
// Content-Type). A step that fails is reported with its status, and the remaining steps still run.
// OHIF's default data source configuration (platform/app/public/config/default.js) is followed:
// imageRendering and thumbnailRendering 'wadors' (thumbnails are frame 1, rendered in the browser),
// enableStudyLazyLoad (series listed, then each series' metadata), singlepart 'bulkdata,video',
// bulkDataURI enabled, omitQuotationForMultipartRequest.

import { createHash } from 'node:crypto';
import dicomweb from 'dicomweb-client';
import XHR2 from 'xhr2';

const requests = [];

// XMLHttpRequest as a browser has it, noting each request and its answer.
class RecordedXMLHttpRequest extends XHR2 {
  open(method, url, ...rest) {
    this._noted = { method: method.toUpperCase(), url, accept: null, authorization: false };
    return super.open(method, url, ...rest);
  }

  setRequestHeader(name, value) {
    if (name.toLowerCase() === 'accept') this._noted.accept = String(value);
    if (name.toLowerCase() === 'authorization') this._noted.authorization = value.startsWith('Bearer ');
    return super.setRequestHeader(name, value);
  }

  send(body) {
    requests.push(this._noted);
    this.addEventListener('readystatechange', () => {
      if (this.readyState === 4) {
        this._noted.status = this.status;
        this._noted.contentType = this.getResponseHeader('Content-Type');
      }
    });
    return super.send(body);
  }
}
globalThis.XMLHttpRequest = RecordedXMLHttpRequest;

const input = JSON.parse(await new Promise((resolve) => {
  let text = '';
  process.stdin.on('data', (chunk) => { text += chunk; });
  process.stdin.on('end', () => resolve(text));
}));
const headers = { Authorization: `Bearer ${input.token}` };
const sha256 = (buffer) => createHash('sha256').update(Buffer.from(buffer)).digest('hex');
const first = (element) => (element && element.Value ? element.Value[0] : undefined);

// OHIF's data source: one client for QIDO, one for WADO; singlepart 'bulkdata,video' from its default config.
const client = new dicomweb.api.DICOMwebClient({
  url: input.root, headers, singlepart: 'bulkdata,video',
});
const multipartClient = new dicomweb.api.DICOMwebClient({ url: input.root, headers });

const steps = {};
async function step(name, run) {
  try {
    steps[name] = await run();
  } catch (error) {
    steps[name] = { error: error.message, status: error.status ?? null };
  }
}

// Cornerstone's wadors loader (getPixelData.ts): an XHR with OHIF's Accept (generateAcceptHeader with
// omitQuotationForMultipartRequest), the first part of the multipart answer cut out as the frame.
function loadFrame(url) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('get', url, true);
    xhr.responseType = 'arraybuffer';
    xhr.setRequestHeader('Accept', 'multipart/related; type=application/octet-stream; transfer-syntax=*');
    xhr.setRequestHeader('Authorization', headers.Authorization);
    xhr.onreadystatechange = () => {
      if (xhr.readyState !== 4) return;
      if (xhr.status !== 200) {
        reject(Object.assign(new Error(`frame request answered ${xhr.status}`), { status: xhr.status }));
        return;
      }
      const body = Buffer.from(xhr.response);
      const headerEnd = body.indexOf('\r\n\r\n');
      const lines = body.subarray(0, headerEnd).toString('latin1').split('\r\n');
      const boundary = lines.find((line) => line.startsWith('--'));
      const contentType = lines.find((line) => line.startsWith('Content-Type:'))?.slice(13).trim();
      const end = body.indexOf(boundary, headerEnd + 4);
      if (!boundary || end === -1) {
        reject(new Error('frame answer is not a multipart body with a boundary'));
        return;
      }
      resolve({ contentType, sha256: sha256(body.subarray(headerEnd + 4, end - 2)) });
    };
    xhr.send();
  });
}

// Study list: OHIF's mapParams with no filter typed, then a viewer opened on the study (StudyInstanceUIDs
// mapped with "\" between UIDs, as mapParams does), then the patient's other studies (by the tag 00100020).
const studyListParams = {
  limit: 101, offset: 0, fuzzymatching: false, includefield: '00081030,00080060,00080090,00100030',
};
await step('studies', () => client.searchForStudies({ queryParams: studyListParams }));
await step('studiesByUid', () => client.searchForStudies({
  queryParams: { ...studyListParams, StudyInstanceUID: `${input.study}\\1.2.3.4.5` },
}));
const patientId = first(steps.studies?.[0]?.['00100020']);
await step('studiesOfPatient', () => client.searchForStudies({
  queryParams: { ...studyListParams, '00100020': patientId },
}));
await step('studiesOfAnotherPatient', () => client.searchForStudies({
  queryParams: { ...studyListParams, '00100020': 'SO-someone-else' },
}));
// A filter typed into the study list, wrapped in wildcards (mapParams with supportsWildcard: true).
const accession = first(steps.studies?.[0]?.['00080050']) ?? '';
await step('studiesByAccession', () => client.searchForStudies({
  queryParams: { ...studyListParams, AccessionNumber: `*${accession.slice(2, 8)}*` },
}));

// Viewer: series of the study (seriesInStudy), then each series' metadata (retrieveMetadataLoaderAsync).
await step('series', () => client.searchForSeries({
  studyInstanceUID: input.study, queryParams: { includefield: '0008103E,00080021' },
}));
const seriesUids = Array.isArray(steps.series) ? steps.series.map((s) => first(s['0020000E'])) : [];
steps.metadata = {};
steps.frames = {};
steps.framesNegotiated = {};
steps.bulkData = {};
steps.bulkDataMultipart = {};
for (const seriesUid of seriesUids) {
  let instances;
  try {
    instances = await client.retrieveSeriesMetadata({ studyInstanceUID: input.study, seriesInstanceUID: seriesUid });
  } catch (error) {
    steps.metadata[seriesUid] = { error: error.message, status: error.status ?? null };
    continue;
  }
  steps.metadata[seriesUid] = instances;
  for (const instance of instances) {
    const sop = first(instance['00080018']);
    const count = Number(first(instance['00280008']) || 1);
    const base = `${input.root}/studies/${input.study}/series/${seriesUid}/instances/${sop}`;
    // Each frame as its own imageId (wadors:.../frames/n), frame 1 first: it is also the thumbnail. The cine
    // is prefetched as OHIF does, up to maxNumRequests.prefetch (25) requests at once.
    const loaded = new Array(count);
    let next = 1;
    const worker = async () => {
      while (next <= count) {
        const n = next;
        next += 1;
        try {
          loaded[n - 1] = await loadFrame(`${base}/frames/${n}`);
        } catch (error) {
          loaded[n - 1] = { error: error.message, status: error.status ?? null };
        }
      }
    };
    await loadFrame(`${base}/frames/1`).catch(() => null);
    await Promise.all(Array.from({ length: Math.min(25, count) }, worker));
    steps.frames[sop] = loaded;
    // The media types a data source configured with acceptHeader / requestTransferSyntaxUID for compressed
    // frames asks for, through dicomweb-client: JPEG-LS and JPEG first, anything as stored last.
    try {
      const parts = await multipartClient.retrieveInstanceFrames({
        studyInstanceUID: input.study,
        seriesInstanceUID: seriesUid,
        sopInstanceUID: sop,
        frameNumbers: [1, count],
        mediaTypes: [
          { mediaType: 'image/jls', transferSyntaxUID: '1.2.840.10008.1.2.4.80' },
          { mediaType: 'image/jpeg', transferSyntaxUID: '1.2.840.10008.1.2.4.50' },
          { mediaType: 'application/octet-stream', transferSyntaxUID: '*' },
        ],
      });
      steps.framesNegotiated[sop] = parts.map(sha256);
    } catch (error) {
      steps.framesNegotiated[sop] = { error: error.message, status: error.status ?? null };
    }
    // Pixel data as Bulkdata: OHIF's retrieveBulkData (singlepart 'bulkdata': no Accept of its own), and a
    // data source without singlepart (multipart, application/octet-stream).
    const uri = instance['7FE00010']?.BulkDataURI;
    if (uri) {
      try {
        const parts = await client.retrieveBulkData({ BulkDataURI: uri, multipart: false });
        steps.bulkData[sop] = { uri, parts: parts.map(sha256) };
      } catch (error) {
        steps.bulkData[sop] = { uri, error: error.message, status: error.status ?? null };
      }
      try {
        const parts = await multipartClient.retrieveBulkData({ BulkDataURI: uri });
        steps.bulkDataMultipart[sop] = { uri, parts: parts.map(sha256) };
      } catch (error) {
        steps.bulkDataMultipart[sop] = { uri, error: error.message, status: error.status ?? null };
      }
    }
  }
}

process.stdout.write(JSON.stringify({ steps, requests }));
